"""The decode forward: rows 0..B-1 (= slots 0..B-1) over cache positions [0, L), eager or as CUDA graphs.

On CUDA, each (B, L) bucket is captured once into a CUDA graph and replayed: the whole step (every layer,
routing, experts, attention) is one launch with no host synchronisation. B is rounded up to a power of two
(up to the slot count) and L to a power of two from 64 (up to max_len), so a handful of graphs cover any
mix of running sequences; rows past the live ones write to the cache's trash position (see cache.py). Inputs
are read from the slot buffers in place, so a replay sees whatever the previous step or a prefill wrote there.

With `compile=True` the step's blocks go through torch.compile (inductor fuses the norms, rotary, softmax and
routing glue that otherwise cost a kernel each) before capture. One compiled function serves every block
of a kind, so compile time does not grow with depth: the step is written out here (embedding -> blocks ->
norm -> logits, what Transformer.forward does for one token per row) to call it per block.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _buckets(limit: int, first: int) -> list[int]:
    sizes = []
    n = first
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


def _call_block(block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_cache) -> torch.Tensor:
    return block(h, cos, sin, layer_cache)


class DecodeRunner:
    def __init__(self, model, cache, slots, cuda_graphs: bool, bucketed: bool | None = None,
                 compile: bool = False):
        """bucketed (default: = cuda_graphs) rounds B and L up to the buckets; eager runs use exact sizes."""
        self.model, self.cache, self.slots = model, cache, slots
        self.cuda_graphs = cuda_graphs
        self.compiled = compile
        if compile:
            # one compiled entry per (block kind, B, L bucket): allow more than dynamo's default of 8
            from torch._dynamo import config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), 256))
            self.block = torch.compile(_call_block, dynamic=False)
        self.bucketed = cuda_graphs if bucketed is None else bucketed
        self.batch_sizes = _buckets(cache.num_slots, 1)
        self.lengths = _buckets(cache.max_len, 64)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: dict[tuple[int, int], str] = {}  # buckets whose capture failed: run eagerly, say why
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n) if self.bucketed else n

    def length_bucket(self, n: int) -> int:
        return next(b for b in self.lengths if b >= n) if self.bucketed else n

    def forward(self, B: int, L: int) -> torch.Tensor:
        """The decode step, not captured -> logits (B, V) in the model dtype."""
        s, m = self.slots, self.model
        ids, positions = s.input_ids[:B, None], s.positions[:B, None]
        self.cache.decode(s.positions[:B], L)
        if not self.compiled:
            return m(ids, positions, cache=self.cache, last_only=True)[:, 0]
        cos, sin = m.rotary(positions)
        h = m.embed_tokens(ids)
        for block, layer_cache in zip(m.layers, self.cache.layers):
            h = self.block(block, h, cos, sin, layer_cache)
        return m.logits(m.norm(h))[:, 0]

    def __call__(self, B: int, L: int) -> torch.Tensor:
        key = (B, L)
        if not self.cuda_graphs or key in self.failed:
            return self.forward(B, L)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(B, L)
            except RuntimeError as e:  # a compiler failure, or an op that cannot be captured (a host sync)
                self.failed[key] = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                log.warning("CUDA graph capture of decode batch %d x %d failed (%s); running it eagerly%s",
                            B, L, self.failed[key], " and without torch.compile" if self.compiled else "")
                self.compiled = False  # stay correct: the plain eager step
                torch.cuda.synchronize()
                return self.forward(B, L)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, B: int, L: int):
        # Warm up on a side stream (lazy inits, cuBLAS workspaces) as the CUDA-graph docs ask. A warm-up
        # step only rewrites the cache entries the real step writes, with the same values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(B, L)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(B, L)
        return graph, out
