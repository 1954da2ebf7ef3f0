"""Shared test setup: the Triton interpreter off CUDA, GPU markers, and the fixtures of the inference and
serving tests (a tiny model folder, a live `dsmoe serve`, one-thread torch)."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Triton chooses between its compiler and its CPU interpreter when `triton` is first imported (transformers
# imports it too), so without CUDA the interpreter is selected here, before any test module is collected.
# It only changes how Triton kernels run, and on a machine without CUDA they can run in no other way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waits make
    them many times slower; modules that use this (`pytestmark = pytest.mark.usefixtures("single_thread")`)
    run their torch work on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_config(vocab_size: int):
    from dsmoe.presets import get_preset

    return get_preset("tiny").replace(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, initializer_range=0.08)


def train_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "".join(Path(m.__file__).read_text() for m in (argparse, json.decoder, json.encoder))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i: i + 2000] for i in range(0, len(text), 2000)], trainer)
    return tok


def build_model_dir(root: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A model folder as `dsmoe train` writes one; built once per test session (reused when present)."""
    from dsmoe.checkpoint.hf import save_pretrained
    from dsmoe.model.transformer import build_model

    path = root / ("tiny-chat" if chat_template else "tiny-plain")
    if (path / "config.json").is_file():
        return path
    tok = train_tokenizer()
    torch.manual_seed(0)
    model = build_model(make_tiny_config(tok.get_vocab_size()), dtype=torch.float32)
    save_pretrained(model, path)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
              "add_bos_token": True, "model_max_length": 512}
    if chat_template:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def stats(self) -> dict:
        import httpx  # a [dev] extra: imported only by the tests that start a server

        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["in_flight"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout} s: {stats}")
            time.sleep(0.1)


def start_server(model_dir: Path, log: Path, *extra: str) -> Server:
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "dsmoe", "serve", str(model_dir), "--port", str(port), "--model-name", "tiny",
           "--max-batch", "8", "--max-model-len", "256", *extra]
    handle = log.open("w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dsmoe serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"dsmoe serve did not come up:\n{log.read_text()[-3000:]}")


@contextmanager
def running_server(model_dir: Path, log: Path, *extra: str):
    server = start_server(model_dir, log, *extra)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


# ---- fixtures over the helpers above (tests take these; nothing imports this module) ----------------------

@pytest.fixture(scope="session")
def tiny_config():
    """A function: vocab size -> the tiny V3-style config of the inference tests."""
    return make_tiny_config


@pytest.fixture(scope="session")
def chat_template() -> str:
    return CHAT_TEMPLATE


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model folder with a chat template (random weights, BPE tokenizer), built once per session."""
    return build_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def plain_model_dir(tmp_path_factory) -> Path:
    """The same model folder without a chat template."""
    return build_model_dir(tmp_path_factory.getbasetemp(), chat_template=None)


@pytest.fixture(scope="session")
def serve():
    """A function: (model folder, log file, *extra CLI flags) -> context manager of a live `dsmoe serve`."""
    return running_server
