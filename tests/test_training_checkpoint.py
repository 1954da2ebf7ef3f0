"""Training checkpoints (DCP, here in one process): exact round trip of model, optimizer and RNG states; no pickle;
atomic saves; keep-last-K; refusals."""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmoe.checkpoint import training
from dsmoe.presets import PRESETS
from dsmoe.errors import CheckpointError, UserError
from dsmoe.model.transformer import build_model

CFG = PRESETS["tiny"].replace(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                              n_group=2, topk_group=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                              v_head_dim=8)


def trained_pair(seed=0, steps=2):
    torch.manual_seed(seed)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(steps):
        model(torch.randint(0, 64, (2, 8))).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.update_expert_bias(torch.arange(8).view(2, 4), 0.01)  # a non-zero aux-free bias to carry over
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = trained_pair()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = training.save_checkpoint(tmp_path, 7, model, opt, {"tokens_seen": 99})
    expected = (random.random(), np.random.rand(), torch.rand(()))
    loaded = training.load_model(path)  # the weights alone, for evaluation
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # nothing to unpickle: DCP's metadata sits in the safetensors headers, the rest is JSON
    assert {p.suffix for p in path.rglob("*") if p.is_file()} == {".safetensors", ".json"}

    fresh, fresh_opt = trained_pair(seed=5, steps=1)
    state = training.load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 7 and state["tokens_seen"] == 99
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh_opt.state[q][key]), key
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert (random.random(), np.random.rand(), torch.rand(())) == expected
    # the next optimizer step is identical too
    x = torch.randint(0, 64, (2, 8))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).float().square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained_pair()
    training.save_checkpoint(tmp_path, 10, model, opt, {})
    real_save = training.save_file

    def crash_after_writing(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)  # the tensors and RNG states are written, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(training, "save_file", crash_after_writing)
    with pytest.raises(OSError, match="disk full"):
        training.save_checkpoint(tmp_path, 20, model, opt, {})
    monkeypatch.undo()
    assert training.latest_checkpoint(tmp_path).name == "step_10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10"]  # no partial step_20, no temporary folder
    fresh, fresh_opt = trained_pair(seed=9, steps=1)
    assert training.load_checkpoint(tmp_path / "step_10", fresh, fresh_opt)["step"] == 10


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc")
def test_state_json_reaches_the_disk_before_the_folder_counts_as_complete(tmp_path, monkeypatch):
    """A step folder with a state.json is a complete checkpoint: after a power cut an unflushed, empty one would
    be chosen by --resume and fail to load."""
    model, opt = trained_pair()
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    training.save_checkpoint(tmp_path, 5, model, opt, {})
    assert any(Path(name).name.startswith(".state.json.tmp") for name in flushed)


def test_keep_last_k_and_resaving_a_step(tmp_path):
    model, opt = trained_pair(steps=1)
    for step in (1, 2, 3, 10):
        training.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [p.name for p in training.list_checkpoints(tmp_path)] == ["step_3", "step_10"]  # numeric order
    training.save_checkpoint(tmp_path, 10, model, opt, {"again": True}, keep=2)
    assert training.read_state(tmp_path / "step_10")["again"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_3"]


def test_not_a_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "state.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a dsmoe training checkpoint"):
        training.read_state(tmp_path)


def test_a_checkpoint_of_an_earlier_layout_or_another_model_is_refused(tmp_path):
    model, opt = trained_pair()
    path = training.save_checkpoint(tmp_path, 1, model, opt, {})
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "version": 1}))
    with pytest.raises(CheckpointError, match="layout of an earlier dsmoe"):
        training.read_state(path)
    (path / "state.json").write_text(json.dumps(state))
    wider = build_model(CFG.replace(hidden_size=48))
    with pytest.raises(CheckpointError, match="does not fit this model.*Size mismatch.*embed_tokens"):
        training.load_checkpoint(path, wider)
    weights_only = training.save_checkpoint(tmp_path, 2, model, None, {})
    with pytest.raises(CheckpointError, match="no optimizer state"):
        training.load_checkpoint(weights_only, model, opt)
    with pytest.raises(CheckpointError, match="state.json cannot be read.*of a complete checkpoint"):
        training.load_checkpoint(tmp_path / "step_3", model)


def _save_until_killed(folder: str, during: str) -> None:
    """Child process: two checkpoints, then a third save that stalls (to be killed) inside its writing or inside
    the prune of step_1 (with part of step_1 already deleted)."""
    folder = Path(folder)
    model, opt = trained_pair(steps=1)
    for step in (1, 2):
        training.save_checkpoint(folder, step, model, opt, {})

    def stall():
        (folder / "stalled").touch()
        time.sleep(600)

    if during == "save":
        real_save_rng = training._save_rng
        training._save_rng = lambda file: (real_save_rng(file), stall())
    else:
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if ".deleting-" in str(path):
                next(Path(path).glob("*.safetensors")).unlink()
                stall()
            real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    training.save_checkpoint(folder, 3, model, opt, {}, keep=2)


@pytest.mark.parametrize("during", ["save", "prune"])
def test_a_kill_during_a_save_or_a_prune_leaves_nothing_after_the_resume(tmp_path, during):
    code = f"import test_training_checkpoint as t; t._save_until_killed({str(tmp_path)!r}, {during!r})"
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent, stdout=log, stderr=log,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "stalled").exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the stall"
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    (tmp_path / "stalled").unlink()
    (tmp_path / "child.log").unlink()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [f".step_3.tmp-{child.pid}" if during == "save" else f".step_1.deleting-{child.pid}"]
    expected = ["step_1", "step_2"] if during == "save" else ["step_2", "step_3"]
    assert [p.name for p in training.list_checkpoints(tmp_path)] == expected  # never the partial folder

    model, opt = trained_pair(seed=5, steps=1)
    training.load_checkpoint(training.latest_checkpoint(tmp_path), model, opt)  # what --resume does
    reference, _ = trained_pair(steps=1)  # the child's weights, up to its thread count's rounding
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == expected  # the resume cleared what the kill left


def test_a_finished_save_killed_before_its_rename_is_kept(tmp_path):
    model, opt = trained_pair(steps=1)
    training.save_checkpoint(tmp_path, 1, model, opt, {})
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    shutil.copytree(tmp_path / "step_1", tmp_path / f".step_2.tmp-{dead.pid}")  # complete: it has its state.json
    (tmp_path / f".step_3.tmp-{dead.pid}").mkdir()  # incomplete
    (tmp_path / f".step_4.tmp-{os.getpid()}").mkdir()  # a live process's save in progress: left alone
    training.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".step_4.tmp-{os.getpid()}", "step_1", "step_2"]


def test_checkpoint_code_does_not_import_the_parallelism_package():
    """One direction only: distributed/ and train/ use checkpoint/, never the reverse (no import cycle)."""
    import ast

    for file in (Path(__file__).resolve().parents[1] / "dsmoe" / "checkpoint").glob("*.py"):
        tree = ast.parse(file.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.startswith(("dsmoe.distributed", "dsmoe.train"))], file.name
