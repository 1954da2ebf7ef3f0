"""Gating: which K of the E routed experts each token uses, and with what weight.

One function, `route`, covers every DeepSeek variant (spec section 4):
- V1 (16B): softmax, greedy top-k, no scaling; logits in the model dtype (`ModelConfig.router_fp32=False`).
- V2: softmax in fp32; `greedy` (V2-Lite) or `group_limited_greedy` (groups scored by their best expert,
  top `topk_group` groups kept); weights times `routed_scaling_factor`.
- V3 (`noaux_tc`): sigmoid; a bias (`e_score_correction_bias`, trained aux-loss-free, never by gradient)
  is added for *selection only*; groups scored by the sum of their top-2 biased scores; masked experts get
  -inf; the gate weights are the unbiased scores, renormalised, then scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.kernels import ops


@dataclass
class Routing:
    topk_idx_TK: torch.Tensor  # int64 expert ids
    topk_weight_TK: torch.Tensor  # fp32 gate weights
    scores_TE: torch.Tensor  # fp32 affinities (softmax probabilities or sigmoid scores), unbiased
    counts_E: torch.Tensor  # int64 tokens routed to each expert
    # Adaptive routing: which of the K = k_max slots a token uses, bool (inactive slots carry weight 0, so the
    # expert paths need no change: static shapes, no host sync); None under fixed top-k.
    active_TK: torch.Tensor | None = None


# A pytree node, so hooks that walk a module's outputs (FSDP2's pre-backward unshard) see the tensors inside.
torch.utils._pytree.register_dataclass(Routing)


def route(
    logits_TE: torch.Tensor,
    *,
    top_k: int,
    scoring_func: str,
    topk_method: str,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    bias_E: torch.Tensor | None = None,
    top_p: float | None = None,
    min_k: int = 1,
) -> Routing:
    """top_p set: adaptive routing; `top_k` is then k_max and each token keeps the leading experts (in order
    of choice) whose normalised affinities sum to top_p, at least min_k of them."""
    T, E = logits_TE.shape
    if scoring_func == "softmax":
        scores = logits_TE.softmax(dim=-1, dtype=torch.float32)
    else:
        scores = logits_TE.float().sigmoid()
    choice = scores if bias_E is None else scores + bias_E.float()
    if topk_method != "greedy" and n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        if topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_score = grouped.amax(dim=-1)
        keep_G = torch.zeros_like(group_score, dtype=torch.bool)
        keep_G.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep_G.repeat_interleave(E // n_group, dim=1), float("-inf"))
    topk_idx = choice.topk(top_k, dim=-1).indices
    weight = scores.gather(1, topk_idx)
    active = None
    if top_p is not None:
        active = adaptive_active(scores, topk_idx, top_p, min_k)
        weight = weight * active
    if norm_topk_prob:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    weight = weight * routed_scaling_factor
    counts = torch.zeros(E, dtype=torch.int64, device=logits_TE.device)
    # scatter_add, not bincount: bincount reads the max back to the host on CUDA (a sync per layer)
    counts.scatter_add_(0, topk_idx.flatten(),
                        torch.ones_like(topk_idx.flatten()) if active is None else active.flatten().long())
    return Routing(topk_idx, weight, scores, counts, active)


def adaptive_cumulative(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """Normalised affinity mass of the slots before each slot, in choice order: [T, K] fp32."""
    mass = scores_TE.gather(1, topk_idx_TK) / scores_TE.sum(dim=-1, keepdim=True)
    return mass.cumsum(dim=-1) - mass


def uniform_top_p_count(top_p: float, n_experts: int, min_k: int, k_max: int) -> int:
    """The experts a token takes under top-p routing when all affinities are equal, as a fresh router's nearly
    are: the first j whose mass j / E reaches top_p, within [min_k, k_max]."""
    return min(k_max, max(min_k, math.ceil(top_p * n_experts - 1e-9)))


def adaptive_start_note(c: ModelConfig) -> str:
    """A line for a training plan when a fresh top-p router would give every token far more or fewer experts
    than its target (README: adaptive routing), else ""."""
    if c.routing_top_p is None or c.routing_target_k is None:
        return ""
    start = uniform_top_p_count(c.routing_top_p, c.n_routed_experts, c.routing_min_k, c.num_experts_per_tok)
    if abs(start - c.routing_target_k) < 2:
        return ""
    return (f"\nnote: at routing_top_p {c.routing_top_p:g} a fresh router gives every token about {start} experts "
            f"(target {c.routing_target_k:g}); routing_top_p near {c.routing_target_k / c.n_routed_experts:.3f} "
            "starts it at the target")


def adaptive_active(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, top_p: float, min_k: int) -> torch.Tensor:
    """Slot j is used while the mass before it is below top_p (so the used slots reach top_p), or j < min_k."""
    before = adaptive_cumulative(scores_TE, topk_idx_TK)
    first = torch.arange(topk_idx_TK.shape[1], device=topk_idx_TK.device) < min_k
    return (before < top_p) | first  # bool, like padding's mask: the two combine with &


def route_options(c: ModelConfig) -> dict:
    """The keyword arguments of `route` that a model config fixes (all but the logits and the bias)."""
    return dict(top_k=c.num_experts_per_tok, scoring_func=c.scoring_func, topk_method=c.topk_method,
                n_group=c.n_group, topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
                routed_scaling_factor=c.routed_scaling_factor)


class Router(nn.Module):
    """`mlp.gate` in checkpoints: weight [E, D], and for noaux_tc the selection bias [E] (fp32 buffer)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x_TD: torch.Tensor, impl: str = "reference") -> Routing:
        """`impl` is the experts' resolved implementation (`ops.resolve_impl`): when that is Triton, the fused
        routing kernel replaces `route` (same contract, one launch)."""
        c = self.config
        if c.router_fp32:
            with torch.autocast(x_TD.device.type, enabled=False):  # autocast would route in bf16
                logits = ops.router_logits(x_TD, self.weight, impl)
        else:
            logits = F.linear(x_TD, self.weight.to(x_TD.dtype))
        kw = route_options(c)
        if c.routing_top_p is not None:  # the fused kernel routes fixed top-k only
            return route(logits, bias_E=self.e_score_correction_bias, top_p=c.routing_top_p,
                         min_k=c.routing_min_k, **kw)
        if impl == "triton":
            return Routing(*ops.route_fused(logits, self.e_score_correction_bias, **kw))
        return route(logits, bias_E=self.e_score_correction_bias, **kw)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()
