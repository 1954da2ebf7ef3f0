"""The expert-parallel dispatch on its own (ExpertParallelExperts, no FSDP), 2 and 4 CPU processes against one process
running `Experts` over every rank's tokens, fp32: forward and every gradient (hidden states, gate weights, expert
weights) for the exact dispatch and for the capacity-bounded one with a capacity that cannot overflow, under
skewed routing (experts without tokens, ranks that receive nothing), T = 1 and a shared MLP; with a small capacity
the dropped share equals an independent count and the output equals one process with the same decisions dropped;
the bounded dispatch never reads a tensor on the host in forward or backward (the exact one does); ranks whose
micro-batches differ in length agree on buffers sized for the longest."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dsmoe.distributed.ep_dispatch import capacities
from dsmoe.distributed.expert_parallel import ExpertParallelExperts
from dsmoe.distributed.mesh import ParallelDims, build_mesh
from dsmoe.distributed.testing import run_distributed
from dsmoe.model.layers import MLP
from dsmoe.model.moe import Experts

E, K, D, F = 8, 3, 16, 8
# name -> (tokens per rank, capacity factor (None: exact; "never": the EP degree, which cannot overflow), routing,
# with a shared MLP, ragged: rank r routes 3r tokens fewer and the capacity is sized for the longest, padded: the
# first half of the tokens are padding (their decisions do not count, so they must neither travel nor take capacity))
CASES = {
    "exact": (12, None, "random", False, False, False),
    "exact, skewed, ragged": (12, None, "skewed", False, True, False),
    "exact, padded": (12, None, "random", True, False, True),
    "bounded": (12, "never", "random", True, False, False),
    "bounded, skewed": (12, "never", "skewed", False, False, False),
    "bounded, one token": (1, "never", "random", False, False, False),
    "bounded, small capacity": (24, 0.75, "random", True, False, False),
    "bounded, small capacity, skewed": (12, 1.0, "skewed", False, False, False),
    "bounded, small capacity, ragged": (24, 1.0, "random", False, True, False),
    "bounded, balanced capacity, padded": (24, 1.0, "random", False, False, True),
}


def test_capacities():
    # T=100 tokens, K=6, R=4, L=16: balanced share 150 rows and (M=2) 50 pairs per rank
    assert capacities(100, 6, 4, 16, 1.25, 2) == (63, 188)
    assert capacities(100, 6, 4, 16, 4.0, 4) == (100, 600)  # factor >= R: the bounds that never drop
    assert capacities(100, 6, 4, 2, 100.0, 4) == (100, 200)  # at most L = 2 experts of a token on one rank
    assert capacities(1, 1, 8, 1, 0.01, 8) == (1, 1)


def _inputs(rank: int, tokens: int, routing: str):
    """x, topk ids, gate weights and the output gradient of one rank. Skewed: every token picks experts 0 and 1
    (K = 2), so the other experts get no tokens and every rank but the first receives nothing."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, D, generator=g)
    if routing == "skewed":
        idx = torch.stack([torch.randperm(2, generator=g) for _ in range(tokens)])
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    return x, idx, torch.rand(idx.shape, generator=g), torch.randn(tokens, D, generator=g)


def _keep_reference(idx: torch.Tensor, active: torch.Tensor, world: int, factor: float | None,
                    budget: int) -> torch.Tensor:
    """[T, K] whether each decision survives: the active ones, pairs to each rank first come, first served, while
    both the pair count and the row count stay within the capacity (a loop over tokens, independent of the
    dispatch code)."""
    if factor is None:
        return active.clone()
    T, k = idx.shape
    pairs, rows = capacities(budget, k, world, E // world, factor, world)
    keep = torch.zeros(idx.shape, dtype=torch.bool)
    for rank in range(world):
        placed = used = 0
        for t in range(T):
            mine = ((idx[t] // (E // world)) == rank) & active[t]
            if not mine.any():
                continue
            placed, used = placed + 1, used + int(mine.sum())
            if placed <= pairs and used <= rows:
                keep[t] |= mine
    return keep


@contextlib.contextmanager
def no_host_reads():
    """Every way a tensor's values reach Python raises (a host sync on CUDA)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dispatch read a tensor on the host")

    names = ("tolist", "item", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(_patched(torch.Tensor, name, refuse))
        for name in ("nonzero", "masked_select", "unique", "argwhere"):
            stack.enter_context(_patched(torch, name, refuse))
        yield


@contextlib.contextmanager
def _patched(owner, name, value):
    old = owner.__dict__.get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if old is None:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


def _run(module, x, idx, w, g, shared, active=None, impl="grouped"):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = module(x, idx, w, impl, shared, active)
    (y * g).sum().backward()
    return y.detach(), x.grad, w.grad


def _worker(rank: int, world: int) -> None:
    mesh = build_mesh(ParallelDims(world, ep=world), "cpu")
    L = E // world
    for name, (tokens, factor, routing, with_shared, ragged, padded) in CASES.items():
        factor = world if factor == "never" else factor
        torch.manual_seed(0)
        experts = Experts(E, D, F)
        experts.reset_parameters(0.3)
        shared = MLP(D, F) if with_shared else None
        ep = ExpertParallelExperts(experts, mesh.ep_mesh, factor, max_ranks_per_token=world,
                                   capacity_tokens=tokens if ragged else None)
        lengths = [tokens - 3 * r if ragged else tokens for r in range(world)]
        ranks = [_inputs(r, n, routing) for r, n in enumerate(lengths)]
        actives = [torch.arange(n)[:, None].expand(n, r[1].shape[1]) >= (n // 2 if padded else 0)
                   for n, r in zip(lengths, ranks)]
        x, idx, w, g = ranks[rank]
        if factor is None:
            y, dx, dw = _run(ep, x, idx, w, g, shared, actives[rank] if padded else None)
        else:
            with no_host_reads():
                y, dx, dw = _run(ep, x, idx, w, g, shared, actives[rank] if padded else None)

        # one process: every rank's tokens, the dropped (and padding's) decisions' weights zeroed
        keep = torch.cat([_keep_reference(r[1], a, world, factor, tokens) for r, a in zip(ranks, actives)])
        cat = [torch.cat(parts) for parts in zip(*ranks)]
        reference = _run(lambda x, idx, w, *rest: experts(x, idx, w * keep, *rest[:2]), *cat, shared)
        rows = slice(sum(lengths[:rank]), sum(lengths[:rank + 1]))
        for got, want, what in zip((y, dx, dw), reference, ("output", "d hidden", "d gate weights")):
            torch.testing.assert_close(got, want[rows], atol=1e-5, rtol=1e-5, msg=f"{name}: {what}")
        for pname in ("gate_up_proj", "down_proj"):
            got = getattr(ep, pname).grad.to_local()
            want = getattr(experts, pname).grad[rank * L:(rank + 1) * L]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{name}: d {pname}")
        dropped = 1 - keep[rows].float().sum() / actives[rank].float().sum()
        if factor is not None:
            assert ep.dropped_share.item() == pytest.approx(dropped.item(), abs=1e-6), name
        if "small capacity" in name and rank == 0:
            assert dropped > 0, f"{name}: the scenario drops nothing"
        if "balanced capacity, padded" in name:  # the capacity of 24 tokens holds the 12 real ones
            assert ep.dropped_share.item() == 0, name
        if "skewed" in name:
            assert (idx // L == 0).all(), name  # every token stays on rank 0: the others receive nothing

    # the check above cannot pass vacuously: the exact dispatch does read its split sizes on the host
    ep = ExpertParallelExperts(Experts(E, D, F), mesh.ep_mesh)
    x, idx, w, g = _inputs(rank, 4, "random")
    with pytest.raises(AssertionError, match="read a tensor on the host"), no_host_reads():
        _run(ep, x, idx, w, g, None)


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_equals_one_process(world):
    run_distributed(_worker, world, timeout_s=90)


def _graph_worker(rank: int, world: int) -> None:
    """bf16 on the GPU kernels: forward + backward of the bounded dispatch with the CUDA sync check on "error", then
    captured in one CUDA graph (NCCL all-to-alls included) and replayed on new inputs: equal to eager."""
    from dsmoe.kernels import ops

    mesh = build_mesh(ParallelDims(world, ep=world), "cuda")
    torch.manual_seed(0)
    experts = Experts(E, 64, 32).cuda()
    experts.reset_parameters(0.1)
    experts.to(torch.bfloat16)
    ep = ExpertParallelExperts(experts, mesh.ep_mesh, capacity_factor=0.9, max_ranks_per_token=world)
    shared = MLP(64, 32).cuda().to(torch.bfloat16)

    def inputs(seed: int):
        g = torch.Generator().manual_seed(seed + 10 * rank)
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(256)])
        return [t.cuda() for t in (torch.randn(256, 64, generator=g).bfloat16(), idx,
                                   torch.rand(256, 2, generator=g), torch.randn(256, 64, generator=g).bfloat16())]

    x, idx, w, dy = inputs(0)
    x.requires_grad_()
    w.requires_grad_()
    impl = ops.resolve_impl("auto", x, experts.gate_up_proj)
    params = [x, w, ep.gate_up_proj, ep.down_proj]

    def step() -> torch.Tensor:
        y = ep(x, idx, w, impl, shared)
        y.backward(dy)
        return y

    def grads() -> list[torch.Tensor]:
        return [(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone() for p in params]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: NCCL communicators, autotuning
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for p in params:
        p.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    with torch.no_grad():
        for static, new in zip((x, idx, w, dy), inputs(1)):
            static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    captured = [y_static.clone(), *grads(), ep.dropped_share.clone()]
    for p in params:
        p.grad = None
    eager = [step().detach(), *grads(), ep.dropped_share.clone()]
    for name, a, b in zip(("output", "d x", "d w", "d gate_up", "d down", "dropped share"), captured, eager):
        torch.testing.assert_close(a, b, msg=name)
    assert 0 < eager[-1] < 0.5  # 0.9 x the balanced share drops some


@pytest.mark.gpu
def test_gpu_bounded_dispatch_never_syncs_and_captures_in_a_cuda_graph():
    run_distributed(_graph_worker, 1, backend="nccl", timeout_s=300)


@pytest.mark.multi_gpu
def test_two_gpus_bounded_dispatch_never_syncs_and_captures_in_a_cuda_graph():
    run_distributed(_graph_worker, 2, backend="nccl", timeout_s=300)
