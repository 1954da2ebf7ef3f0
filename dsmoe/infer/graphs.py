"""CUDA graphs for the forwards that run many times at a few shapes: the engine's decode step (runner.py) and
the hidden states of right-padded token batches that likelihood scoring runs (`dsmoe eval --task`, lm-eval).

An eager forward of a small or medium batch is bound by the host: measured on an H200, the `small` preset's
forward over 2048 tokens takes 27 ms of wall time for 4.7 ms of GPU kernels (about 590 launches). Replaying a
captured graph launches the same kernels without the host in the loop.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def capture(forward, pool, warmups: int = 2):
    """(graph, output) of `forward()` captured into `pool`. Warm-up runs on a side stream first (lazy inits,
    cuBLAS workspaces, Triton autotuning), as the CUDA-graph docs ask; they must only write what the captured
    call writes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


def try_capture(forward, pool, failed: dict, key, what: str):
    """capture(), or None when the forward cannot be captured (a compiler failure, an op that syncs with the
    host): then failed[key] says why, a warning is logged, and the caller runs that shape eagerly from now on."""
    try:
        return capture(forward, pool)
    except RuntimeError as e:
        failed[key] = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        log.warning("CUDA graph capture of %s failed (%s); running it eagerly", what, failed[key])
        torch.cuda.synchronize()
        return None


def width_bucket(n: int, first: int = 64) -> int:
    """n rounded up to first * 2^k or 1.5 * first * 2^k (at most 1.5x padding, two buckets per octave)."""
    size = first
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


class HiddenStates:
    """model(ids, return_hidden=True) for right-padded (b, w) batches of token ids, on CUDA through one graph
    per (rows, width) bucket, captured at first use and replayed after. Widths round up by width_bucket; rows
    to what the caller's batches of that width hold (max_batch, or fewer where its token budget cuts a batch
    of long sequences short), so a task captures about one graph per width (each capture costs warm-up
    forwards). Padding holds whatever ids an
    earlier batch left: padding after a sequence cannot change its hidden states (causal attention; routing is
    per token and drops nothing). Batches past `max_tokens` padded tokens run eagerly rather than capture a
    graph of that size; so does everything on the CPU."""

    def __init__(self, model, max_batch: int, batch_tokens: int = 16384, max_tokens: int = 32768,
                 cuda_graphs: bool = True):
        """batch_tokens: the padded tokens the caller puts in one batch (score_requests' max_tokens), so a
        batch of long sequences, cut short by that budget, is not padded back up to max_batch rows."""
        self.model = model
        self.max_batch, self.batch_tokens = max_batch, batch_tokens
        self.device = next(model.parameters()).device
        self.max_tokens = max_tokens
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.failed: dict[tuple[int, int], str] = {}  # buckets whose capture failed (a host sync): run eagerly

    def eager(self, ids: torch.Tensor) -> torch.Tensor:
        from dsmoe.infer.runner import eager

        with eager():  # blocks someone compiled for other shapes run as written
            return self.model(ids, return_hidden=True)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        b, w = ids.shape
        W = width_bucket(w)
        key = (max(b, min(self.max_batch, self.batch_tokens // W)), W)
        if not self.cuda_graphs or key[0] * key[1] > self.max_tokens or key in self.failed:
            return self.eager(ids)
        if key not in self.graphs:
            static = torch.zeros(key, dtype=torch.long, device=self.device)
            captured = try_capture(lambda: self.eager(static), self.pool, self.failed, key,
                                   f"a {key[0]} x {key[1]} scoring forward")
            if captured is None:
                return self.eager(ids)
            self.graphs[key] = (*captured, static)
        graph, out, static = self.graphs[key]
        static[:b, :w].copy_(ids)
        graph.replay()
        return out[:b, :w]
