"""The engine's forwards: prefill chunks (eager), and the decode step, rows 0..B-1 (= slots 0..B-1) over cache
positions [0, L), eager or as CUDA graphs.

On CUDA, each (B, L) bucket is captured once into a CUDA graph and replayed: the whole step (every layer,
routing, experts, attention) is one launch with no host synchronisation. B is rounded up to a power of two
(up to the slot count) and L to a power of two from 64 (up to max_len), so a handful of graphs cover any
mix of running sequences; rows past the live ones write to the cache's trash position (see cache.py). Inputs
are read from the slot buffers in place, so a replay sees whatever the previous step or a prefill wrote there.

`SamplingRunner` is the same step with the next tokens drawn inside it (one graph then holds the whole step, the
sampling too), for batches whose requests need no logits on the host (no logprobs, no repetition penalty).

With `compile=True` the model's blocks are compiled in place (regional compilation: one compiled graph per
block kind and shape, so compile time does not grow with depth; inductor fuses the norms, rotary, softmax and
routing glue that otherwise cost a kernel each) and the decode step runs them before capture. Every step is
`Transformer.forward` itself. Prefill chunks have a new length each time, so they always run eagerly
(`torch.compiler.set_stance`), as does the decode step of an engine without `compile`, even on a model whose
blocks someone else compiled. The recompile limit is raised only around this engine's own decode calls.
"""

from __future__ import annotations

import torch

from dsmoe.infer.graphs import try_capture
from dsmoe.infer.sampling import sample

# compiled entries: a few block kinds x the (B, L) buckets; dynamo's default limit (8) would fall back to eager
RECOMPILE_LIMIT = 256


def _buckets(limit: int, first: int) -> list[int]:
    sizes = []
    n = first
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


def eager():
    return torch.compiler.set_stance("force_eager")


class DecodeRunner:
    def __init__(self, model, cache, slots, cuda_graphs: bool = False, bucketed: bool | None = None,
                 compile: bool = False, like: "DecodeRunner | None" = None):
        """bucketed (default: = cuda_graphs) rounds B and L up to the buckets; eager runs use exact sizes.
        like: another step over the same model (a variant of it): its graph switches, compiled blocks and graph
        memory pool (one stream replays every graph in turn)."""
        if like is not None:
            cuda_graphs, bucketed = like.cuda_graphs, like.bucketed
        self.model, self.cache, self.slots = model, cache, slots
        self.cuda_graphs = cuda_graphs
        self.compiled = compile
        if compile:
            for block in model.layers:
                block.compile(dynamic=False)
        self.bucketed = cuda_graphs if bucketed is None else bucketed
        self.batch_sizes = _buckets(cache.num_slots, 1)
        self.lengths = _buckets(cache.max_len, 64)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: dict[tuple[int, int], str] = {}  # buckets whose capture failed: run eagerly, say why
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        if like is not None:
            self.compiled, self.pool = like.compiled, like.pool
        self.samplers: dict[tuple, SamplingRunner] = {}

    def sampling(self, flags: dict) -> "SamplingRunner":
        """This step with its next tokens drawn inside it (one CUDA graph holds it all), for these sampler switches."""
        key = tuple(sorted(flags.items()))
        if key not in self.samplers:
            self.samplers[key] = SamplingRunner(self, flags)
        return self.samplers[key]

    @torch.no_grad()
    def warm_up(self, prefill_tokens: int) -> None:
        """Pay now what the first request of each size would pay later, in its latency: per shape, Triton's
        autotuning (seconds on a GPU) and torch.compile, shared by every step variant. Prefills of 1, 2, 4, ...
        up to `prefill_tokens` tokens give the expert kernels every row-count bucket a prompt step can; the
        decode step runs once per batch bucket, uncaptured (which variant of it a batch takes, sampling inside
        or not, is the requests' choice; its capture at first use costs a few forwards). Only cache rows of free
        slots are written (a prompt overwrites what it reads), so call it before the first request."""
        device = self.slots.input_ids.device
        for n in _buckets(min(prefill_tokens, self.cache.max_len), 1):
            self.prefill(torch.zeros(1, n, dtype=torch.long, device=device), [0], 0, return_hidden=True)
        for batch in self.batch_sizes:
            self.forward(batch, self.lengths[0])

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n) if self.bucketed else n

    def length_bucket(self, n: int) -> int:
        return next(b for b in self.lengths if b >= n) if self.bucketed else n

    def prefill(self, ids: torch.Tensor, slots: int | list[int], start: int, **kw) -> torch.Tensor:
        """Prompt chunks ids (n, S) at positions start.., row i into slots[i] (one slot: n = 1; shorter rows
        right-padded, see cache.py): the model's forward with `kw` (last_only, return_hidden)."""
        S = ids.shape[1]
        with eager():
            view = self.cache.prefill(slots, start, S)
            positions = torch.arange(start, start + S, device=ids.device)
            return self.model(ids, positions, cache=view, **kw)

    def forward(self, B: int, L: int):
        """The decode step, not captured, compiled or forced eager as this runner says."""
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if self.compiled else eager():
            return self.step(B, L)

    def step(self, B: int, L: int):
        """Rows 0..B-1 over cache positions [0, L) -> logits (B, V) in the model dtype."""
        s = self.slots
        view = self.cache.decode(s.positions[:B], L)
        return self.model(s.input_ids[:B, None], s.positions[:B, None], cache=view, last_only=True)[:, 0]

    def __call__(self, B: int, L: int) -> torch.Tensor:
        key = (B, L)
        if not self.cuda_graphs or key in self.failed:
            return self.forward(B, L)
        if key not in self.graphs:
            # a warm-up step only rewrites the cache entries the real step writes, with the same values
            captured = try_capture(lambda: self.forward(B, L), self.pool, self.failed, key,
                                   f"decode batch {B} x {L}" + (" (compiled; torch.compile is dropped too)"
                                                                if self.compiled else ""))
            if captured is None:
                self.compiled = False  # stay correct: the plain eager step
                return self.forward(B, L)
            self.graphs[key] = captured
        graph, out = self.graphs[key]
        graph.replay()
        return out


class SamplingRunner(DecodeRunner):
    """The decode step and the sampling of its next tokens -> tokens (B,), for one set of the sampler's switches
    (any_random, any_filtered). Shares the plain runner's compiled blocks and graph memory pool."""

    def __init__(self, runner: DecodeRunner, flags: dict):
        super().__init__(runner.model, runner.cache, runner.slots, like=runner)
        self.flags = dict(flags)

    def step(self, B: int, L: int) -> torch.Tensor:
        s = self.slots
        logits = super().step(B, L).float()
        return sample(logits, s.temperature[:B], s.top_k[:B], s.top_p[:B], s.seed[:B], s.positions[:B] + 1,
                      **self.flags)
