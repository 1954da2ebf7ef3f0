"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Schedules (step counts from 0; `lr_at` gives the rate used by optimizer step `step`):
- warmup: linear from lr/warmup to lr over `warmup_steps`;
- cosine: from lr down to lr * min_lr_ratio at the last step;
- wsd (warmup-stable-decay): lr until the last `decay_fraction` of the steps, then linear to lr * min_lr_ratio.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsmoe.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Norm weights (1-D) are not decayed; every matrix (embeddings, projections, stacked experts, router) is.
    Always the fused kernel (CUDA and CPU): one launch per dtype group, and it takes the trainer's on-device
    "step is not finite" flag as `found_inf`, which the foreach and for-loop implementations do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 2, 0))  # a run shorter than its warmup still decays
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(total_steps * cfg.decay_fraction)) if cfg.decay_fraction > 0 else 0
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return peak
        return peak + (floor - peak) * (step - decay_start + 1) / decay_steps
    span = max(total_steps - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
