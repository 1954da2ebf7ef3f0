"""`dsmoe train` under torchrun: 2 CPU processes (gloo), expert parallel 2. Its steps (with the sync-free dispatch
at a capacity that cannot overflow: ep_dropped 0) equal one process's steps on the same global batch; its sharded
checkpoint resumes in one process and continues as the one-process run does; its exported run folder loads with
load_pretrained and gives the same logits; resumed on the same 2 ranks it continues bit for bit, dropout included
(each rank's RNG states travel with the checkpoint); a one-process checkpoint (the same layout) resumes on 2 ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared_data import SHAKESPEARE
from dsmoe import load_pretrained
from dsmoe.cli import main
from dsmoe.data.batches import micro_batches_per_rank
from dsmoe.distributed.runtime import init_from_env
from dsmoe.distributed.testing import run_distributed
from dsmoe.errors import UserError
from dsmoe.train.config import TrainConfig
from dsmoe.train.trainer import Trainer

# 4 experts, top-2 without group limits: tokens reach one or both EP ranks
MODEL = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
         "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}
# 5 validation windows: the 2 ranks evaluate 3 and 2 of them (one rank runs a forward it does not count)
CONFIG = {"model": MODEL, "vocab_size": 300, "seq_len": 32, "micro_batch": 2, "steps": 6, "warmup_steps": 2,
          "eval_interval": 3, "eval_tokens": 160, "checkpoint_interval": 3, "log_interval": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    data = folder / "data.txt"
    data.write_text(Path(SHAKESPEARE).read_text()[:60_000])
    return str(data), folder / "cache"


def cli_flags(config: dict) -> list[str]:
    flags = []
    for key, value in config.items():
        flags.append("--" + key.replace("_", "-"))
        flags += [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else [str(value)]
    return flags


def run_steps(trainer: Trainer, n: int) -> list[dict]:
    for _ in range(n):
        trainer.train_step()
    return trainer.read_steps()


def records(run: Path, key: str) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def test_torchrun_training_equals_one_process_resumes_in_one_and_exports(corpus, tmp_path, monkeypatch):
    data, cache = corpus
    monkeypatch.setenv("DSMOE_CACHE", str(cache))
    # the global batch of 2 ranks x 1 micro-batch, accumulated in one process (recomputing activations in backward
    # under torchrun changes nothing but memory)
    reference = Trainer(TrainConfig(**CONFIG, data=[data], grad_accum=2), tmp_path / "reference", cache_dir=cache,
                        progress=False)

    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsmoe",
               "train", "--ep", "2", "--dist-timeout", "60", "--data", data, "--out", str(run), *cli_flags(CONFIG),
               "--stop-after", "3", "--no-progress", "--activation-checkpointing", "--ep-capacity-factor", "2"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("stopped at step 3 of 6") == 1  # rank 0 alone reports
    assert "on 2 ranks (cpu, expert parallel 2 x data parallel 1, 1 micro-batches of 2 per rank)" in done.stdout
    assert "sync-free dispatch in training, capacity factor 2" in done.stdout + done.stderr  # the flag arrived

    steps = run_steps(reference, 3)
    for key in ("lm_loss", "aux_loss", "grad_norm", "lr"):
        expected = [s[key] for s in steps]
        assert [records(run, key)[i] for i in (1, 2, 3)] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
    assert records(run, "val_loss")[3] == pytest.approx(reference.evaluate()["val_loss"], rel=1e-6)
    assert records(run, "ep_dropped") == {1: 0.0, 2: 0.0, 3: 0.0}

    # the export of the sharded model (rank 0 writes, one parameter gathered at a time)
    exported = load_pretrained(run, moe_impl="grouped").eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    reference.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), reference.model(ids), atol=1e-5, rtol=1e-5)
    reference.model.train()
    for name in ("tokenizer.json", "tokenizer_config.json", "train_config.json", "plots/loss.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "step_3" / "ranks" / "rank_1.safetensors").is_file()  # sharded layout

    # world size 2 -> 1: the sharded checkpoint reshards into one process, which accumulates 2 micro-batches
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    steps = run_steps(reference, 3)
    for key in ("lm_loss", "grad_norm"):
        assert [records(run, key)[i] for i in (4, 5, 6)] == pytest.approx([s[key] for s in steps], rel=1e-5), key
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3", "step_6"]
    assert main(["eval", str(run / "checkpoints" / "step_3"), "--data", data, "--max-tokens", "200"]) == 0


def _train_two_ranks(rank: int, world: int, config: dict, out: str, cache: str, stop_after, resume: bool) -> None:
    rt = init_from_env(ep=2, device_type="cpu")  # gloo: the same on a machine with GPUs
    Trainer(TrainConfig(**config), out, resume=resume, reducer=rt, cache_dir=Path(cache),
            progress=False).train(stop_after=stop_after)


@pytest.mark.slow
def test_resume_on_the_same_ranks_is_bit_exact_with_dropout(corpus, tmp_path):
    data, cache = corpus
    config = {**CONFIG, "data": [data], "steps": 4, "eval_interval": 2, "checkpoint_interval": 2, "dropout": 0.1}
    run_distributed(_train_two_ranks, 2, config, str(tmp_path / "straight"), str(cache), None, False)
    run_distributed(_train_two_ranks, 2, config, str(tmp_path / "split"), str(cache), 2, False)
    run_distributed(_train_two_ranks, 2, config, str(tmp_path / "split"), str(cache), None, True)
    for key in ("lm_loss", "grad_norm", "val_loss"):
        assert records(tmp_path / "straight", key) == records(tmp_path / "split", key), key
    a, b = load_pretrained(tmp_path / "straight"), load_pretrained(tmp_path / "split")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_ranks(corpus, tmp_path):
    data, cache = corpus
    config = {**CONFIG, "data": [data], "grad_accum": 2}
    run = tmp_path / "run"
    Trainer(TrainConfig(**config), run, cache_dir=cache, progress=False).train(stop_after=3)
    assert not (run / "checkpoints" / "step_3" / "ranks" / "rank_1.safetensors").exists()  # one process wrote it
    # the same config on 2 ranks: 1 micro-batch each keeps the global batch; each rank reads its own slices
    run_distributed(_train_two_ranks, 2, config, str(run), str(cache), None, True)
    reference = Trainer(TrainConfig(**config), tmp_path / "reference", cache_dir=cache, progress=False)
    steps = run_steps(reference, 6)[3:]
    for key in ("lm_loss", "grad_norm"):
        assert [records(run, key)[i] for i in (4, 5, 6)] == pytest.approx([s[key] for s in steps], rel=1e-5), key


def test_the_global_batch_survives_a_change_of_world_size_or_the_resume_is_refused(capsys):
    assert micro_batches_per_rank(micro_batch=2, sequences_per_step=8, world_size=1) == 4
    assert micro_batches_per_rank(micro_batch=2, sequences_per_step=8, world_size=4) == 1
    with pytest.raises(UserError, match="resume on a number of ranks that divides 4"):
        micro_batches_per_rank(micro_batch=2, sequences_per_step=8, world_size=3)
    assert main(["train", "--ep", "2", "--steps", "1", "--out", "/nonexistent/run"]) == 2  # no torchrun
    assert main(["train", "--ep-capacity-factor", "2", "--steps", "1", "--out", "/nonexistent/run"]) == 2
    assert "launch with torchrun" in capsys.readouterr().err


def _torchrun_train(run: Path, data: str, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsmoe",
               "train", "--ep", "2", "--data", data, "--out", str(run), "--no-progress", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.multi_gpu
def test_two_gpus_equal_one_and_sharded_init_draws_distinct_shards(corpus, tmp_path, monkeypatch):
    """NCCL on 2 GPUs, fp32: the same steps as one GPU; --sharded-init (meta device, then each rank initialises
    its own shards) gives every shard its own random numbers."""
    data, cache = corpus
    monkeypatch.setenv("DSMOE_CACHE", str(cache))
    config = {**CONFIG, "steps": 3, "dtype": "fp32", "device": "cuda"}
    reference = Trainer(TrainConfig(**config, data=[data], grad_accum=2), tmp_path / "reference", cache_dir=cache,
                        progress=False)
    done = _torchrun_train(tmp_path / "run", data, *cli_flags(config))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    steps = run_steps(reference, 3)
    for key in ("lm_loss", "grad_norm"):
        assert [records(tmp_path / "run", key)[i] for i in (1, 2, 3)] == pytest.approx(
            [s[key] for s in steps], rel=1e-4), key

    done = _torchrun_train(tmp_path / "sharded", data, *cli_flags({**config, "steps": 1, "lr": 1e-9}), "--sharded-init")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    model = load_pretrained(tmp_path / "sharded")
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.experts.gate_up_proj"):
        weight = model.get_parameter(name).detach()
        half = weight.shape[0] // 2
        assert weight.std() > 0 and not torch.allclose(weight[:half], weight[half:]), name
