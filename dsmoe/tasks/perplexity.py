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


def evaluate_loss(model: torch.nn.Module, windows: list[np.ndarray], **kw) -> tuple[float, int]:
    """Mean loss over every predicted token of the windows (each 1-D, seq_len + 1 tokens) and their count
    (evaluate_windows' keywords)."""
    result = evaluate_windows(model, windows, **kw)
    return result["loss"], result["tokens"]


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, windows: list[np.ndarray], *, batch_size: int, device: torch.device,
                     autocast_dtype: torch.dtype | None = None, reducer=None, drafts: bool = False) -> dict:
    """{"loss": mean next-token loss, "tokens": its count} over the windows; with drafts (a model with MTP
    modules) also "mtp_loss" (the mean over depths of each depth's loss, as training weighs them) and
    "draft_agreement": the share of positions where depth 1's top token equals the model's own top token one
    position later, which is how often greedy speculative decoding keeps a first draft (given the text so far).
    Under data parallelism each rank takes every world_size-th window and the sums are reduced. A sharded model
    (FSDP, expert parallelism) needs every rank in every forward, so all ranks run the same number of batches:
    a rank out of windows runs one it does not count."""
    reducer = reducer or SingleProcess()
    mine = windows[reducer.rank::reducer.world_size]
    rounds = math.ceil(math.ceil(len(windows) / reducer.world_size) / batch_size)
    was_training = model.training
    model.eval()
    depth = len(model.mtp) if drafts else 0
    forward_kw = {"with_mtp": True} if depth else {}
    # sums: main nll and count, agreeing first drafts and their count, then nll and count per MTP depth
    sums = torch.zeros(4 + 2 * depth, dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        for start in range(0, rounds * batch_size, batch_size):
            group = mine[start:start + batch_size]
            if not group:
                with autocast:
                    model(torch.from_numpy(windows[0][None, :-1]).to(device), **forward_kw)
                continue
            for length in sorted({len(w) for w in group}):  # only a lone short last window differs
                ids = torch.from_numpy(np.stack([w for w in group if len(w) == length])).to(device)
                targets = ids[:, 1:]
                with autocast:
                    out = model(ids[:, :-1], **forward_kw)
                logits, mtp_logits = out if depth else (out, [])
                sums[0] += _nll(logits, targets)
                sums[1] += targets.numel()
                for k, lg in enumerate(mtp_logits, 1):
                    sums[2 + 2 * k] += _nll(lg[:, :-k], targets[:, k:])
                    sums[3 + 2 * k] += targets[:, k:].numel()
                if depth:
                    sums[2] += (mtp_logits[0][:, :-1].argmax(-1) == logits[:, 1:].argmax(-1)).sum()
                    sums[3] += targets[:, 1:].numel()
    finally:
        model.train(was_training)
    sums = reducer.sum(sums).tolist()
    n = int(sums[1])
    result = {"loss": sums[0] / n if n else float("nan"), "tokens": n}
    if depth and sums[3]:
        result["draft_agreement"] = sums[2] / sums[3]
        result["mtp_loss"] = sum(sums[4 + 2 * k] / sums[5 + 2 * k] for k in range(depth)) / depth
    return result


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
