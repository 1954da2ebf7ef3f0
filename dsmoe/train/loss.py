"""The trainer's two seams: what a micro-batch is, and the loss computed from it.

Every training mode plugs into the one loop (trainer.py) through these: pretraining uses `Batch` and
`next_token_loss`; fine-tuning and multi-token prediction bring their own batch type (anything with
`.to(device)`) and loss function. A loss function returns the scalar to differentiate (a mean over the
micro-batch) and a dict of detached scalars to log; the trainer averages both over micro-batches and ranks,
adds the MoE balance loss (it joins in backward, see model/balance.py), and keeps everything on the device
until the log interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from dsmoe.model.mtp import mtp_loss
from dsmoe.model.packed_attention import PackedLayout
from dsmoe.train.cross_entropy import IGNORE_INDEX, linear_cross_entropy


@dataclass
class Batch:
    """One micro-batch of token ids: input_ids (B, S) and labels (B, S), where labels[b, s] is the token to
    predict after input_ids[b, s], or IGNORE_INDEX (-100) where no loss is taken (prompts, padding);
    token_mask (B, S) bool, for padded batches: the real input tokens (the MoE statistics count only them).
    Packed batches (several examples per row) add positions (B, S), restarting at 0 in every example, and
    packing, where the examples lie (segment ids, and the boundaries the varlen attention kernel reads): attention
    and MTP targets stay within an example."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    token_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    packing: PackedLayout | None = None

    @property
    def segment_ids(self) -> torch.Tensor | None:
        return None if self.packing is None else self.packing.segment_ids

    @classmethod
    def from_windows(cls, windows: torch.Tensor) -> Batch:
        """(B, S + 1) consecutive tokens -> inputs are the first S, labels the last S."""
        return cls(windows[:, :-1], windows[:, 1:])

    def to(self, device: torch.device) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.input_ids, self.labels, self.token_mask, self.positions, self.packing)))


class BatchSource(Protocol):
    def batches(self, step: int, dp_rank: int, dp_size: int) -> list:
        """This rank's micro-batches of optimizer step `step` (host tensors), a pure function of its arguments:
        resume is exact, and data parallelism picks a rank's slice of the same global batch."""


LossFn = Callable[[torch.nn.Module, object], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def next_token_loss(model: torch.nn.Module, batch: Batch, mtp_weight: float = 0.0,
                    chunk_tokens: int | None = None, main_only: bool = False, mtp_targets: str = "tokens"
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy of the labelled positions; the logits are never materialised whole: the
    output projection and the loss run chunk by chunk (cross_entropy.py). A model with MTP modules adds
    mtp_weight x their mean cross-entropy (DeepSeek-V3's lambda; model/mtp.py), from their full logits, unless
    main_only (evaluation: the main model's loss alone); mtp_targets "model" has them learn the main model's own
    distributions instead of the text's tokens."""
    inputs = dict(positions=batch.positions, token_mask=batch.token_mask, packing=batch.packing)
    if main_only or not model.config.num_nextn_predict_layers:
        hidden = model(batch.input_ids, return_hidden=True, **inputs)
        # read after the forward: under FSDP the root's forward has gathered the whole head (kept until backward)
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        loss = linear_cross_entropy(hidden.flatten(0, 1), head, batch.labels.flatten(), chunk_tokens=chunk_tokens)
        return loss, {"lm_loss": loss.detach()}
    logits, mtp_logits = model(batch.input_ids, with_mtp=True, **inputs)
    lm = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
    mtp = mtp_loss(mtp_logits, batch.labels, ignore_index=IGNORE_INDEX, segment_ids=batch.segment_ids,
                   teacher_logits=logits if mtp_targets == "model" else None)
    return lm + mtp_weight * mtp, {"lm_loss": lm.detach(), "mtp_loss": mtp.detach()}


__all__ = ["Batch", "BatchSource", "IGNORE_INDEX", "LossFn", "next_token_loss"]
