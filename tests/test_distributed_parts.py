"""The single-process pieces of dsmoe.distributed and `dsmoe bench scale`: degree checks, the one-process
runtime, gradient clipping, the device-level losses' layout, AC and compile wiring, step-time accounting,
and the benchmark on 1 and 2 CPU processes."""

from __future__ import annotations

import argparse
import contextlib
import json
import re

import pytest
import torch
from distributed_common import CFG, lm_loss, make_model, micro_batch

from dsmoe.bench import scale
from dsmoe.bench.scale_timing import kernels_from_trace, step_time_split
from dsmoe.distributed.mesh import ParallelDims
from dsmoe.distributed.parallelize import parallelize
from dsmoe.distributed.runtime import clip_grad_norm_, init_from_env
from dsmoe.distributed.testing import run_distributed
from dsmoe.errors import UserError
from dsmoe.model.balance import (
    affinity_probs,
    communication_balance_loss,
    device_balance_loss,
    expert_balance_loss,
)


def test_degrees_must_fit_the_world():
    assert ParallelDims(8, ep=4).dp == 2
    with pytest.raises(UserError, match=r"--ep 3 does not divide the world size 4.*\[1, 2, 4\]"):
        ParallelDims(4, ep=3)
    with pytest.raises(UserError, match="--dp-shard 3 x --ep 2"):
        ParallelDims(4, ep=2, dp_shard=3)
    with pytest.raises(UserError, match="must divide the number of routed experts"):
        ParallelDims(6, ep=6).check_experts(64)
    with pytest.raises(UserError, match="--ep-capacity-factor 0 must be positive"):
        ParallelDims(4, ep=2, ep_capacity_factor=0)


def test_one_process_runtime_is_the_identity(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    rt = init_from_env(device_type="cpu")
    t = torch.tensor([1.0, 2.0])
    assert (rt.rank, rt.world_size, rt.mesh, rt.is_main) == (0, 1, None, True)
    assert rt.sum(t) is t and rt.mean(t) is t and (rt.data_rank, rt.data_size) == (0, 1)


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 1.0)
    c, d = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    c.grad, d.grad = a.grad.clone(), b.grad.clone()
    norm = clip_grad_norm_([a, b], 1.0)
    expected = torch.nn.utils.clip_grad_norm_([c, d], 1.0)
    assert norm.item() == pytest.approx(expected.item()) == pytest.approx(29**0.5)
    torch.testing.assert_close(a.grad, c.grad)
    torch.testing.assert_close(b.grad, d.grad)


def test_device_losses_use_the_expert_layout():
    """The layer's balance loss = expert + device + communication losses over experts_per_device."""
    model = make_model()
    moe = model.moe_layers()[0]
    captured = {}
    moe.gate.register_forward_hook(lambda m, i, out: captured.update(routing=out))
    for per_device, devices in ((2, 4), (4, 2)):  # the config's 4 groups; then EP = 2's real layout
        moe.experts_per_device = per_device
        model(micro_batch(0, 0))
        r = captured["routing"]
        probs = affinity_probs(r.scores_TE, CFG.scoring_func)
        device_E = torch.arange(CFG.n_routed_experts) // per_device
        expected = expert_balance_loss(probs, r.topk_idx_TK, CFG.aux_loss_alpha, 8)
        expected = expected + device_balance_loss(probs, r.topk_idx_TK, device_E, devices, CFG.device_aux_loss_alpha)
        m = moe.max_devices_per_token()
        assert m == min(CFG.num_experts_per_tok, CFG.topk_group * -(-devices // CFG.n_group))
        expected = expected + communication_balance_loss(probs, r.topk_idx_TK, device_E, devices, m,
                                                         CFG.comm_aux_loss_alpha)
        torch.testing.assert_close(moe.aux_loss, expected.detach())


@pytest.mark.parametrize("ac,compile_scope", [(True, None), (False, "blocks"), (False, "model"), (True, "blocks"),
                                            (True, "model")])
def test_one_process_parallelize_keeps_results_and_names(ac, compile_scope):
    """What the trainer runs in one process: parallelize(mesh=None) with AC and compile per block or whole."""
    model, ref = make_model(), make_model()
    names = [n for n, _ in model.named_parameters()]
    if compile_scope:  # dynamo's eager backend: checks the wiring without the cost of inductor on a CPU
        # Under that backend activation checkpointing recomputes outside the trace, where fp32 CPU experts take
        # grouped rather than the traced reference path (inductor recomputes inside its graph: `dsmoe train
        # --compile --activation-checkpointing` runs on the CPU); the reference is one path either way.
        model.moe_impl = ref.moe_impl = "reference"
    parallelize(model, None, ac=ac, compile=compile_scope is not None, compile_backend="eager",
                compile_scope=compile_scope or "blocks")
    assert [n for n, _ in model.named_parameters()] == names
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == ([] if not compile_scope else [model] if compile_scope == "model" else model.blocks())
    ids = micro_batch(0, 0)
    lm_loss(model, ids)[0].backward()
    lm_loss(ref, ids)[0].backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_step_time_split():
    kernels = [("gemm", 0, 10), ("ncclDevKernel_SendRecv", 5, 15), ("ncclKernel_AllGather", 20, 25)]
    split = step_time_split(kernels)  # window 25: compute 10, NCCL alone 5 + 5, nothing 5
    assert split == pytest.approx({"compute": 0.4, "exposed_comm": 0.4, "idle": 0.2})
    assert step_time_split([]) == {}


def test_kernels_from_a_chrome_trace(tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1.0, "dur": 2.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.5, "dur": 3.0},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 4.0}]}))
    assert kernels_from_trace(trace) == [("gemm", 1.0, 3.0)]


BENCH_ARGS = ["--preset", "tiny", "--layers", "2", "--batch", "1", "--seq", "16", "--steps", "1",
              "--warmup", "1", "--dtype", "fp32"]


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    return scale.run(parser.parse_args(argv))


def test_bench_scale_one_process(monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert _bench(BENCH_ARGS) == 0
    out = capsys.readouterr().out
    assert "| weak scaling" in out and "MISMATCH" not in out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table and all(line.count("|") == 4 for line in table)  # 3 markdown cells: no "|" inside one
    assert re.search(r"\| loss, global batch: N GPUs vs 1 GPU +\| [0-9.]+ vs [0-9.]+ \(rel [-+.e0-9]+\) ok ", out)


def _bench_worker(rank: int, world: int, out_file: str) -> None:
    with open(out_file if rank == 0 else "/dev/null", "w") as f, contextlib.redirect_stdout(f):
        assert _bench([*BENCH_ARGS, "--ep-capacity-factor", "2"]) == 0


@pytest.mark.slow
def test_bench_scale_two_processes(tmp_path):
    out_file = tmp_path / "bench.txt"
    run_distributed(_bench_worker, 2, str(out_file), timeout_s=120)
    out = out_file.read_text()
    assert "2 rank(s), backend gloo" in out
    for row in ("| 2 GPUs tokens/s per GPU", "| weak scaling", "| dispatch / bare all-to-all", "(rel",
                "| backward ms, host enqueue / wall: 1 GPU; 2 GPUs"):
        assert row in out, row
        assert f"| sync-free (capacity factor 2): {row[2:]}" in out or row == "(rel", row  # both dispatches timed
    assert re.search(r"\| sync-free \(capacity factor 2\): routing decisions dropped \(last steps\) +\| 0\.00% ", out)
    assert out.count(") ok ") == 2 and "MISMATCH" not in out  # both equal one GPU's loss
