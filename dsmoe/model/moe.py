"""The DeepSeekMoE layer: router -> permute -> routed experts -> weighted combine, plus shared experts.

Shape suffixes: B batch, S sequence, T = B*S tokens, D model dim, E routed experts, K experts per token,
F expert hidden dim.

y_TD = sum_k w_tk * Expert_{idx_tk}(x_t) + SharedMLP(x_t)

After each forward the layer keeps, in buffers, the tokens each expert received (`expert_counts`) and
its balance loss (`aux_loss`, 0 outside training), so a trainer reads statistics through
`Transformer.routing_stats()` without reaching into routing. Buffers are overwritten, not accumulated:
recomputation under activation checkpointing routes identically and leaves the same values.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.kernels import ops
from dsmoe.model.balance import AddAuxiliaryLoss, affinity_probs, expert_balance_loss
from dsmoe.model.layers import MLP
from dsmoe.model.router import Router


class Experts(nn.Module):
    """The routed experts as stacked weights: gate_up_proj [E, 2F, D] (rows [gate; up]), down_proj [E, D, F].

    Expert parallelism replaces this module from outside with one holding E/ep experts and an
    all-to-all around the same call, so `MoE.forward` reads the same on one device and on many.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        return ops.moe_experts(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.down_proj, self.impl)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, impl: str = "auto"):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, impl)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )
        self.aux_loss_scale = 1.0  # the trainer sets 1/grad_accum so the aux loss weighs alpha per step
        self.register_buffer("expert_counts", torch.zeros(config.n_routed_experts, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.gate(x_TD)
        y_TD = self.experts(x_TD, routing.topk_idx_TK, routing.topk_weight_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        with torch.no_grad():
            self.expert_counts.copy_(routing.counts_E)
        alpha = self.config.aux_loss_alpha
        if self.training and alpha > 0 and torch.is_grad_enabled():
            probs = affinity_probs(routing.scores_TE, self.config.scoring_func)
            aux = expert_balance_loss(probs, routing.topk_idx_TK, alpha, S if self.config.seq_aux else None)
            y_TD = AddAuxiliaryLoss.apply(y_TD, aux * self.aux_loss_scale)
            self.aux_loss.copy_(aux.detach())
        return y_TD.view(B, S, D)

    def reset_parameters(self, std: float) -> None:
        self.gate.reset_parameters(std)
        self.experts.reset_parameters(std)
        if self.shared_experts is not None:
            for lin in (self.shared_experts.gate_proj, self.shared_experts.up_proj, self.shared_experts.down_proj):
                nn.init.normal_(lin.weight, std=std)
        self.expert_counts.zero_()
        self.aux_loss.zero_()
