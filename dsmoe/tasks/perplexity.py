"""Next-token cross-entropy (and perplexity) of a model over token windows: validation during training and
`dsmoe eval`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from dsmoe.train.reduce import SingleProcess


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, windows: list[np.ndarray], *, batch_size: int, device: torch.device,
                  autocast_dtype: torch.dtype | None = None, reducer=None) -> tuple[float, int]:
    """Mean loss over every predicted token of the windows (each 1-D, seq_len + 1 tokens) and their count.
    Under data parallelism each rank takes every world_size-th window and the sums are reduced. A sharded model
    (FSDP, expert parallelism) needs every rank in every forward, so all ranks run the same number of batches:
    a rank out of windows runs one it does not count."""
    reducer = reducer or SingleProcess()
    mine = windows[reducer.rank::reducer.world_size]
    rounds = math.ceil(math.ceil(len(windows) / reducer.world_size) / batch_size)
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        for start in range(0, rounds * batch_size, batch_size):
            group = mine[start:start + batch_size]
            if not group:
                with autocast:
                    model(torch.from_numpy(windows[0][None, :-1]).to(device))
                continue
            for length in sorted({len(w) for w in group}):  # only a lone short last window differs
                ids = torch.from_numpy(np.stack([w for w in group if len(w) == length])).to(device)
                with autocast:
                    logits = model(ids[:, :-1])
                nll += F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").double()
                count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    nll, count = reducer.sum(nll), reducer.sum(count)
    n = int(count.item())
    return (nll.item() / n if n else float("nan")), n


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
