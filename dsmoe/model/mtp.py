"""DeepSeek-V3 multi-token prediction (MTP): D sequential modules after the main model.

Module k (1..D) predicts token t+k+1 at position t from the previous depth's hidden state h^{k-1}_t (the main
model's final-normed hidden state for k = 1) and the embedding of token t+k (spec section 7):
    h'^k_t = eh_proj([enorm(Emb(x_{t+k})) ; hnorm(h^{k-1}_t)])      (embedding first, as the checkpoints)
    h^k    = Block_k(h')   (a full decoder layer, MoE when the model has experts)
    P^k_t  = lm_head(shared_head.norm(h^k_t))                    (embedding and lm_head shared with the model)
Training keeps every depth at the full sequence length (static shapes for compile and CUDA graphs): the input
of depth k is the sequence shifted left by k, padded at the end; the last k positions have no target and are
left out of the loss. At inference the modules draft tokens for self-speculative decoding (dsmoe.infer).

Parameter names equal the hub keys of layer num_hidden_layers + k - 1 (`mtp.{k-1}.enorm.weight` <->
`model.layers.{L+k-1}.enorm.weight`), so checkpoint/hf.py maps them by renaming the prefix only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.model.layers import RMSNorm
from dsmoe.model.packed_attention import PackedLayout
from dsmoe.model.transformer import Block, cast_model, init_module_weights


class SharedHead(nn.Module):
    """The MTP output norm. The head itself is the main model's lm_head (checkpoints store a copy of it as
    `shared_head.head`, which dsmoe writes on save and does not keep twice in memory)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(Block):
    """MTP depth `depth` (0-based): a decoder Block (so activation checkpointing, compile, FSDP and expert
    parallelism treat it as one more block) with the MTP input projection and output norm added."""

    def __init__(self, config: ModelConfig, depth: int, moe_impl: str):
        super().__init__(config, config.num_hidden_layers + depth, moe_impl)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache=None, token_mask: torch.Tensor | None = None,
                packing: PackedLayout | None = None) -> torch.Tensor:
        """h_prev (B, S, D) the previous depth's hidden state, emb (B, S, D) the embedding of the token k
        ahead -> this depth's hidden state (B, S, D), before shared_head.norm. token_mask: the positions
        whose token k ahead is real (see Transformer.forward)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, cos, sin, cache, token_mask, packing)


def shifted_inputs(input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """The input of MTP depth k at every position t: token t+k, padded with 0 past the end (those positions
    have no target; causal attention keeps them from influencing the others)."""
    return F.pad(input_ids[:, k:], (0, k), value=0)


def same_segment_ahead(segment_ids: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S) bool: position t and position t+k belong to the same packed example (False past the end)."""
    same = torch.zeros_like(segment_ids, dtype=torch.bool)
    same[:, :-k] = segment_ids[:, k:] == segment_ids[:, :-k]
    return same


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor, ignore_index: int = -100,
             segment_ids: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(1/D) sum_k CE(depth k) (spec eq 25 without lambda). targets (B, S) are the main model's (token t+1 at
    position t); depth k's logits at position t predict token t+k+1 = targets[:, t+k]. With segment_ids (packed
    sequences) a target in another segment than position t is not one of its tokens and is left out. With
    teacher_logits (the main model's, (B, S, V)) depth k learns the main model's distribution at position t+k,
    which predicts the same token (self-distillation: the soft cross-entropy, no gradient into the teacher), over
    the same positions."""
    S = targets.shape[1]
    if not mtp_logits:
        raise ValueError("mtp_loss needs the logits of at least one MTP module")
    if S <= len(mtp_logits):
        raise ValueError(f"sequence length {S} leaves no target for MTP depth {len(mtp_logits)}: use a longer one")
    losses = []
    for k, logits in enumerate(mtp_logits, 1):
        ahead = targets[:, k:]
        if segment_ids is not None:
            ahead = ahead.masked_fill(~same_segment_ahead(segment_ids, k)[:, : S - k], ignore_index)
        if teacher_logits is None:
            losses.append(F.cross_entropy(logits[:, : S - k].flatten(0, 1).float(), ahead.flatten(),
                                          ignore_index=ignore_index))
            continue
        keep = ahead != ignore_index
        teacher = teacher_logits[:, k:][keep].detach().float().softmax(-1)
        losses.append(-(teacher * logits[:, : S - k][keep].float().log_softmax(-1)).sum(-1).mean())
    return torch.stack(losses).mean()


def new_mtp_module(config: ModelConfig, depth: int, moe_impl: str, device: torch.device | str,
                   dtype: torch.dtype) -> MTPModule:
    """MTP depth `depth` (0-based) initialised as build_model initialises it (the global RNG's next draws), in
    `dtype` with the router in fp32; on the meta device: empty, for the caller to fill."""
    with torch.device("meta"):
        module = MTPModule(config, depth, moe_impl)
    if torch.device(device).type != "meta":
        module.to_empty(device=device)
        init_module_weights(module, config.initializer_range)
        cast_model(module, dtype)
    return module


def set_mtp_depth(model, count: int) -> list[int]:
    """Give `model` exactly `count` MTP modules: drop those past it, or append fresh ones (new_mtp_module, where
    the model's embedding is) -> the depths added. Updates model.config.num_nextn_predict_layers."""
    have = len(model.mtp)
    model.config = model.config.replace(num_nextn_predict_layers=count)
    if count <= have:
        del model.mtp[count:]
        return []
    weight = model.embed_tokens.weight
    for depth in range(have, count):
        model.mtp.append(new_mtp_module(model.config, depth, model.moe_impl, weight.device, weight.dtype))
    return list(range(have, count))
