"""Shared pieces of the multi-process tests (tests/test_distributed_*.py): a tiny model, its batches, the
single-process reference step, and helpers that gather a sharded model's results onto rank 0.

The reference for N ranks with a global batch of N micro-batches is one process looping over the same N
micro-batches (gradients accumulated with loss / N and aux-loss scale 1 / N): the same as one forward over
the global batch for everything per sequence, and the definition of the batch-wise balance losses, which
are computed per micro-batch on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from dsmoe.presets import PRESETS
from dsmoe.model.transformer import build_model

# 8 experts, top-3, 4 routing groups of 2 experts with 2 groups per token: with EP = 4 the groups are the
# devices (device-limited routing, M = 2); every balance loss on, so the router gradient checks them all.
CFG = PRESETS["tiny"].replace(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, aux_loss_alpha=0.01,
    device_aux_loss_alpha=0.01, comm_aux_loss_alpha=0.01)
MICRO_BATCH, SEQ = 2, 8


def make_model(seed: int = 0, config=CFG):
    torch.manual_seed(seed)
    return build_model(config, "cpu", torch.float32, moe_impl="grouped").train()


def micro_batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, CFG.vocab_size, (MICRO_BATCH, SEQ), generator=g)


def lm_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()), logits


def skew_routing(model) -> None:
    """Bias every MoE layer towards experts 0-3 (the first two groups): tokens never reach experts 4-7,
    so with EP the ranks holding those receive nothing."""
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias[:4] = 1.0


def reference_step(model, step: int, world: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Forward + backward of the global batch as `world` accumulated micro-batches: (mean loss, logits of
    the global batch, expert counts [L, E] summed over it)."""
    model.set_aux_loss_scale(1.0 / world)
    total, logits, counts = 0.0, [], 0
    for rank in range(world):
        loss, lg = lm_loss(model, micro_batch(step, rank))
        (loss / world).backward()
        total += loss.item() / world
        logits.append(lg.detach())
        counts = counts + model.routing_stats()[0]
    return total, torch.cat(logits), counts


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (same shape on every rank)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)
