"""The DeepSeekMoE layer: router -> permute -> routed experts -> weighted combine, plus shared experts.
At decode shapes on the Triton path the routed and shared experts run together in two kernels instead
(`shared_weights_to_fold`, `ops.experts_decode`).

Shape suffixes: B batch, S sequence, T = B*S tokens, D model dim, E routed experts, K experts per token,
F expert hidden dim.

y_TD = sum_k w_tk * Expert_{idx_tk}(x_t) + SharedMLP(x_t)   (the experts module adds the shared term)

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
from dsmoe.model.balance import (AddAuxiliaryLoss, affinity_probs, communication_balance_loss,
                                 device_balance_loss, expert_balance_loss, expert_count_loss)
from dsmoe.model.layers import MLP
from dsmoe.model.router import Router, Routing


def plus_shared(y_TD: torch.Tensor, x_TD: torch.Tensor, shared: nn.Module | None) -> torch.Tensor:
    """The routed experts' output plus the shared experts' (when the layer has them)."""
    return y_TD if shared is None else y_TD + shared(x_TD)


class Experts(nn.Module):
    """The routed experts as stacked weights: gate_up_proj [E, 2F, D] (rows [gate; up]), down_proj [E, D, F].

    Expert parallelism replaces this module from outside with one holding E/ep experts and an
    all-to-all around the same call, so `MoE.forward` reads the same on one device and on many. The shared
    experts are handed in and added here rather than in `MoE.forward`, so that expert parallelism can run
    them while its split sizes travel between the ranks.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                impl: str, shared: nn.Module | None = None, active_TK: torch.Tensor | None = None) -> torch.Tensor:
        """impl: the resolved implementation (`ops.resolve_impl`), chosen once per layer forward by `MoE`;
        shared: the layer's shared experts, added to the output. active_TK: the decisions that count (False for
        padding and adaptive routing's unused slots); one device computes them all (their outputs are unused or
        weigh 0), expert parallelism does not send them."""
        y_TD = ops.moe_experts(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.down_proj, impl)
        return plus_shared(y_TD, x_TD, shared)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)


def only_real_tokens(routing: Routing, real_T: torch.Tensor) -> Routing:
    """The same routing with padding's decisions marked unused (active_TK) and left out of the counts."""
    idx = routing.topk_idx_TK
    active = real_T[:, None].expand_as(idx)
    if routing.active_TK is not None:
        active = active & routing.active_TK
    counts = torch.zeros_like(routing.counts_E).scatter_add_(0, idx.flatten(), active.flatten().long())
    return Routing(idx, routing.topk_weight_TK, routing.scores_TE, counts, active)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, impl: str = "auto"):
        """impl: the routed experts' implementation asked for (one of `ops.IMPLS`), resolved once per forward
        for the tensors at hand and handed to both the router and the experts."""
        super().__init__()
        if impl not in ops.IMPLS:
            raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {', '.join(ops.IMPLS)}")
        self.config = config
        self.impl = impl
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )
        self.aux_loss_scale = 1.0  # the trainer sets 1/grad_accum so the aux loss weighs alpha per step
        # Expert-to-device layout for the device-level and communication losses: experts are placed
        # contiguously, experts_per_device to a device. One process: the routing groups stand in for devices
        # (V2 trains with n_group = devices); expert parallelism sets the real layout from outside.
        self.experts_per_device = config.n_routed_experts // config.n_group
        self.register_buffer("expert_counts", torch.zeros(config.n_routed_experts, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros((), dtype=torch.int64), persistent=False)  # real ones

    def forward(self, x_BSD: torch.Tensor, token_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """token_mask (B, S) bool: the real tokens of a padded batch. Padding is routed and computed like any
        token (its outputs are never read), but the statistics (expert counts, hence MaxVio and the
        aux-loss-free bias update, and the balance losses) count only the real tokens. segment_ids (B, S): the
        examples of packed rows, each one sequence of the sequence-wise balance loss."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        impl = ops.resolve_impl(self.impl, x_TD, self.experts.gate_up_proj, self.experts.down_proj)
        routing = self.gate(x_TD, impl)
        if token_mask is not None:
            routing = only_real_tokens(routing, token_mask.reshape(B * S))
        shared = self.shared_weights_to_fold(x_TD, routing.topk_weight_TK, impl)
        if shared is not None:
            y_TD = ops.experts_decode(x_TD, routing.topk_idx_TK, routing.topk_weight_TK, self.experts.gate_up_proj,
                                      self.experts.down_proj, shared)
        else:
            y_TD = self.experts(x_TD, routing.topk_idx_TK, routing.topk_weight_TK, impl, self.shared_experts,
                                routing.active_TK)
        with torch.no_grad():
            self.expert_counts.copy_(routing.counts_E)
            # the denominator of adaptive routing's experts per token; fixed top-k (every decode step included)
            # skips this kernel
            if self.config.routing_top_p is not None:
                if token_mask is None:
                    self.routed_tokens.fill_(B * S)
                else:
                    self.routed_tokens.copy_(token_mask.sum())
        c = self.config
        alphas = (c.aux_loss_alpha, c.device_aux_loss_alpha, c.comm_aux_loss_alpha, c.routing_k_loss_alpha)
        if self.training and max(alphas) > 0 and torch.is_grad_enabled():
            aux = self.balance_loss(routing, S, segment_ids)
            y_TD = AddAuxiliaryLoss.apply(y_TD, aux * self.aux_loss_scale)
            self.aux_loss.copy_(aux.detach())
        return y_TD.view(B, S, D)

    def shared_weights_to_fold(self, x_TD: torch.Tensor, topk_weight_TK: torch.Tensor, impl: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The shared MLP's (gate_proj, up_proj, down_proj) weights when the decode kernels can run it with the
        routed experts in the same two launches (`ops.experts_decode`: its S*F-wide MLP read as S more experts
        per token, weight 1), else None. Only for the plain modules: quantized or expert-parallel experts and a
        quantized shared MLP keep their own calls, and so do modules with hooks (analysis reads their outputs,
        which a folded launch never forms)."""
        mlp, experts = self.shared_experts, self.experts
        if mlp is None or impl != "triton" or not isinstance(experts, Experts):
            return None
        projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(isinstance(p, nn.Linear) for p in projections) or any(
                m._forward_hooks or m._forward_pre_hooks for m in (experts, mlp, *projections)):
            return None
        weights = tuple(p.weight for p in projections)
        F = experts.down_proj.shape[2]
        stacks = (experts.gate_up_proj, experts.down_proj)
        if weights[0].shape[0] % F or any(w.dtype != ops.compute_dtype(x_TD) for w in (x_TD, *stacks, *weights)):
            return None
        rows = topk_weight_TK.numel() + x_TD.shape[0] * (weights[0].shape[0] // F)
        return weights if ops.decode_fits(x_TD, rows, topk_weight_TK, *stacks, *weights) else None

    def balance_loss(self, routing: Routing, seq_len: int, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of the enabled balance losses of one forward (spec sections 5.1, 5.2, 5.4)."""
        c = self.config
        probs = affinity_probs(routing.scores_TE, c.scoring_func)
        idx, active = routing.topk_idx_TK, routing.active_TK
        aux = probs.new_zeros((), dtype=torch.float32)
        if c.aux_loss_alpha > 0:
            aux = aux + expert_balance_loss(probs, idx, c.aux_loss_alpha, seq_len if c.seq_aux else None, active,
                                            segment_ids)
        if c.device_aux_loss_alpha > 0 or c.comm_aux_loss_alpha > 0:
            device_E = torch.arange(c.n_routed_experts, device=idx.device) // self.experts_per_device
            num_devices = c.n_routed_experts // self.experts_per_device
            if c.device_aux_loss_alpha > 0:
                aux = aux + device_balance_loss(probs, idx, device_E, num_devices, c.device_aux_loss_alpha, active)
            if c.comm_aux_loss_alpha > 0:
                aux = aux + communication_balance_loss(probs, idx, device_E, num_devices,
                                                       self.max_devices_per_token(), c.comm_aux_loss_alpha, active)
        if c.routing_k_loss_alpha > 0:
            aux = aux + expert_count_loss(routing.scores_TE, idx, c.routing_top_p, c.routing_min_k,
                                          c.routing_target_k, c.routing_k_loss_alpha, active)
        return aux

    def max_devices_per_token(self) -> int:
        """M of the communication loss: the most devices one token can reach. Group-limited routing keeps
        topk_group groups, so at most the devices spanned by the topk_group widest groups."""
        c = self.config
        E, per_device = c.n_routed_experts, self.experts_per_device
        limit = min(c.num_experts_per_tok, E // per_device)
        if c.topk_method != "greedy" and c.n_group > 1:
            per_group = E // c.n_group
            spans = sorted((((g + 1) * per_group - 1) // per_device - g * per_group // per_device + 1
                            for g in range(c.n_group)), reverse=True)
            limit = min(limit, sum(spans[:c.topk_group]))
        return limit

    def reset_parameters(self, std: float) -> None:
        """Every weight of the layer (router, routed and shared experts) and its statistics."""
        self.gate.reset_parameters(std)
        self.experts.reset_parameters(std)
        if self.shared_experts is not None:
            for lin in (self.shared_experts.gate_proj, self.shared_experts.up_proj, self.shared_experts.down_proj):
                nn.init.normal_(lin.weight, std=std)
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.expert_counts.zero_()
        self.aux_loss.zero_()
        self.routed_tokens.zero_()
