"""Batches as a pure function of (seed, step, dp_rank, dp_size): resume is exact, and data parallelism only
picks a rank's slice of the same global batch.

Each optimizer step draws `micro_batch * grad_accum * dp_size` windows of seq_len + 1 tokens at uniformly
random offsets of the training shard (inputs are the first seq_len tokens, targets the last seq_len).
Rank r takes windows [r * micro_batch * grad_accum, (r + 1) * micro_batch * grad_accum), split into
grad_accum micro-batches; so 1 process with grad_accum=2 sees the same step as 2 processes with 1.
"""

from __future__ import annotations

import numpy as np

from dsmoe.errors import UserError


def step_offsets(seed: int, step: int, n_tokens: int, seq_len: int, sequences: int) -> np.ndarray:
    """Start offsets of the global batch of `step` (sequences windows of seq_len + 1 tokens)."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=sequences)


def step_batches(tokens: np.ndarray, *, seq_len: int, micro_batch: int, grad_accum: int, seed: int, step: int,
                 dp_rank: int = 0, dp_size: int = 1) -> list[np.ndarray]:
    """This rank's micro-batches of one step, each int64 (micro_batch, seq_len + 1)."""
    per_rank = micro_batch * grad_accum
    offsets = step_offsets(seed, step, len(tokens), seq_len, per_rank * dp_size)
    mine = offsets[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    windows = np.stack([np.asarray(tokens[o:o + seq_len + 1], dtype=np.int64) for o in mine])
    return list(windows.reshape(grad_accum, micro_batch, seq_len + 1))


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """The validation split cut into consecutive windows of seq_len + 1 tokens overlapping by one, so each
    token after the first is predicted exactly once; capped at about max_tokens predictions; a split shorter
    than one window gives one shorter window."""
    if seq_len < 1:
        raise ValueError(f"evaluation windows need seq_len >= 1, got {seq_len}")
    n = len(tokens)
    if n < 2:
        return []
    length = min(seq_len, n - 1)
    count = (n - 1) // length
    if max_tokens is not None:
        count = max(1, min(count, max_tokens // length))
    return [np.asarray(tokens[i * length:i * length + length + 1], dtype=np.int64) for i in range(count)]


def micro_batches_per_rank(micro_batch: int, sequences_per_step: int, world_size: int) -> int:
    """Gradient-accumulation steps per rank that keep a run's global batch on `world_size` ranks."""
    per_rank, rest = divmod(sequences_per_step, micro_batch * world_size)
    if rest or per_rank == 0:
        raise UserError(f"this run takes {sequences_per_step} sequences per step, which {world_size} ranks x "
                        f"--micro-batch {micro_batch} do not divide: resume on a number of ranks that divides "
                        f"{sequences_per_step // micro_batch}")
    return per_rank
