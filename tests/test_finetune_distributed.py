"""`dsmoe finetune` under torchrun: 2 CPU processes (gloo) running the CLI as torchrun's ranks do. A LoRA SFT
on the experts with expert parallelism (stopped and resumed) and a merged LoRA classifier with FSDP2 data
parallelism give one process's losses, evaluation and saved files; the adapter written by the sharded run loads
in PEFT and in dsmoe with equal logits; a full fine-tune with expert parallelism resumes on the same 2 ranks bit
for bit and on 1 process as the 2 ranks continue.

One process accumulates the 2 ranks' micro-batches (--grad-accum 2). Micro-batches of one row: a classifier's
step examples are sorted by length per rank, so larger micro-batches would group them differently on 1 and on
2 ranks (the same mean loss, but other groups for the batch-wise balance loss)."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dsmoe.cli import main
from dsmoe.distributed.testing import run_distributed

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--seq-len", "48", "--micro-batch", "1", "--no-progress", "--warmup-steps", "1", "--log-interval", "1",
        "--dist-timeout", "60"]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"say {i}" + " please" * (i % 4)},
                          {"role": "assistant", "content": f"{i}!"}]} for i in range(16)]
    return write(tmp_path_factory.mktemp("chats") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def spam(tmp_path_factory):
    rows = [{"text": f"win a prize now {i}", "label": "spam"} if i % 3 == 0 else
            {"text": f"see you at lunch {i}", "label": "ham"} for i in range(24)]
    folder = tmp_path_factory.mktemp("spam")
    return write(folder / "train.jsonl", rows), write(folder / "test.jsonl", rows[:9])


def _cli(rank: int, world: int, argv: list[str]) -> None:
    assert main(argv) == 0


def on_two_ranks(argv: list[str]) -> None:
    run_distributed(_cli, 2, argv, timeout_s=120)


def records(run, key: str) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def assert_same_run(a, b, keys: tuple[str, ...], rel: float = 1e-5) -> None:
    for key in keys:
        got, want = records(a, key), records(b, key)
        assert got.keys() == want.keys() and got, key
        assert list(got.values()) == pytest.approx(list(want.values()), rel=rel, abs=1e-7), key


def assert_same_files(a, b, name: str, atol: float = 1e-6) -> dict[str, torch.Tensor]:
    x, y = load_file(a / name), load_file(b / name)
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=atol, rtol=1e-5, msg=key)
    return x


def test_expert_parallel_lora_sft_resumed_equals_one_process_and_its_adapter_loads_in_peft(model_dir, chats, tmp_path):
    argv = ["finetune", str(model_dir), "--task", "sft", "--data", str(chats), "--eval-data", str(chats),
            "--steps", "3", "--eval-interval", "3", "--lora-rank", "2", "--bias-update-gamma", "0.01", *FAST]
    two = str(tmp_path / "two")  # expert parallel: each rank holds half the experts and their LoRA factors
    on_two_ranks([*argv, "--ep", "2", "--out", two, "--stop-after", "2"])
    on_two_ranks(["finetune", "--resume", two, "--ep", "2", "--no-progress", "--dist-timeout", "60"])
    assert main([*argv, "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one", ("lm_loss", "aux_loss", "grad_norm"))
    assert records(tmp_path / "two", "val_loss")[3] == pytest.approx(records(tmp_path / "one", "val_loss")[3])
    adapter = assert_same_files(tmp_path / "two", tmp_path / "one", "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # the factors trained
    config = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert not [p for p in (tmp_path / "two").rglob("*") if ".tmp-" in p.name]

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from dsmoe.checkpoint.hf import load_pretrained
    from dsmoe.checkpoint.peft_adapter import load_adapter

    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_pretrained(model_dir)
    extra = load_adapter(ours, tmp_path / "two")
    with torch.no_grad():
        state = dict(ours.named_parameters(), **dict(ours.named_buffers()))
        for name, tensor in extra.items():  # the trained router and its aux-free bias
            state[name].copy_(tensor)
        logits = ours.eval()(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        assert (hf(ids).logits - logits).abs().max() > 1e-4  # the adapter changes the output
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "two").eval()
        torch.testing.assert_close(peft_model(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_lora_classifier_on_two_ranks_merges_as_one_process_does(model_dir, spam, tmp_path):
    train, test = spam
    argv = ["finetune", str(model_dir), "--task", "classify", "--data", str(train), "--eval-data", str(test),
            "--steps", "3", "--eval-interval", "3", "--lora-rank", "2", "--merge", *FAST]
    on_two_ranks([*argv, "--out", str(tmp_path / "two")])
    assert main([*argv, "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0
    # 9 evaluation examples in batches of one: rank 0 counts 5, rank 1 counts 4 (and runs a fifth forward that it
    # does not count, as FSDP needs every rank in every forward); the predictions are gathered
    assert_same_run(tmp_path / "two", tmp_path / "one", ("cls_loss", "grad_norm", "val_loss", "accuracy", "macro_f1"))
    merged = assert_same_files(tmp_path / "two", tmp_path / "one", "model.safetensors")
    assert "score.weight" in merged and not any("lora" in k for k in merged)
    assert_same_files(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", "adapter_model.safetensors")
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"}


def test_expert_parallel_fine_tune_resumes_exactly_on_two_ranks_and_on_one(model_dir, chats, tmp_path):
    argv = ["finetune", str(model_dir), "--task", "sft", "--data", str(chats), "--steps", "4", "--eval-interval",
            "100", "--checkpoint-interval", "2", "--freeze", "embeddings", *FAST]
    on_two_ranks([*argv, "--ep", "2", "--out", str(tmp_path / "straight")])
    on_two_ranks([*argv, "--ep", "2", "--out", str(tmp_path / "split"), "--stop-after", "2"])
    shutil.copytree(tmp_path / "split", tmp_path / "on_one")
    on_two_ranks(["finetune", "--resume", str(tmp_path / "split"), "--ep", "2", "--no-progress"])
    assert_same_run(tmp_path / "split", tmp_path / "straight", ("lm_loss", "grad_norm"), rel=0)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], split[key]), key
    start = load_file(model_dir / "model.safetensors")
    assert torch.equal(straight["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # frozen
    # 2 ranks -> 1 process: the sharded checkpoint reshards and one process accumulates both micro-batches
    assert main(["finetune", "--resume", str(tmp_path / "on_one"), "--no-progress"]) == 0
    assert_same_run(tmp_path / "on_one", tmp_path / "straight", ("lm_loss", "grad_norm"))
    assert_same_files(tmp_path / "on_one", tmp_path / "straight", "model.safetensors", atol=1e-5)


def test_parallel_flags_without_torchrun_are_one_clear_error(model_dir, chats, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["finetune", str(model_dir), "--task", "sft", "--data", str(chats), "--ep", "2", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "launch with torchrun --nproc-per-node N -m dsmoe finetune" in err and err.count("error:") == 1
    assert not out.exists()


def _torchrun(argv: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsmoe",
               *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.multi_gpu
def test_two_gpus_equal_one_and_bf16_compiled_lora_runs(model_dir, chats, tmp_path):
    """NCCL on 2 GPUs through the real torchrun: fp32 expert-parallel LoRA equals one GPU; then bf16 autocast (a
    bf16 frozen base beside fp32 factors in one FSDP group) with activation checkpointing and compile runs and
    writes an adapter dsmoe loads."""
    argv = ["finetune", str(model_dir), "--task", "sft", "--data", str(chats), "--eval-data", str(chats), "--steps",
            "3", "--eval-interval", "3", "--lora-rank", "2", "--device", "cuda", *FAST]
    _torchrun([*argv, "--dtype", "fp32", "--ep", "2", "--out", str(tmp_path / "two")])
    assert main([*argv, "--dtype", "fp32", "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one", ("lm_loss", "grad_norm", "val_loss"), rel=1e-4)
    assert_same_files(tmp_path / "two", tmp_path / "one", "adapter_model.safetensors", atol=1e-5)

    _torchrun([*argv, "--dtype", "bf16", "--activation-checkpointing", "--compile", "--out", str(tmp_path / "bf16")])
    from dsmoe.checkpoint.hf import load_pretrained
    from dsmoe.checkpoint.peft_adapter import load_adapter

    assert load_adapter(load_pretrained(model_dir), tmp_path / "bf16")  # the router travels with the adapter
    assert all(math.isfinite(v) for v in records(tmp_path / "bf16", "lm_loss").values())
