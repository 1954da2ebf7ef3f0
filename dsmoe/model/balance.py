"""Load balancing (spec section 5): balance losses, the aux-loss-free bias update, MaxVio.

All losses follow one shape, alpha * sum_i f_i * P_i, where f_i is the (normalised) share of routing
decisions that went to expert i and P_i the mean affinity of expert i. Under perfect balance f_i = 1 and
P_i = 1/E, so the loss equals alpha.
"""

from __future__ import annotations

import torch


def affinity_probs(scores_TE: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Affinities that sum to 1 per token: softmax already does; sigmoid scores are normalised over all
    experts (V3's sequence-wise loss, eq. 19)."""
    if scoring_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def _slot_weights(topk_idx_TK: torch.Tensor, active_TK: torch.Tensor | None) -> torch.Tensor:
    """1 for every routing decision that is used (all of them under fixed top-k), else 0; fp32."""
    if active_TK is None:
        return torch.ones(topk_idx_TK.shape, device=topk_idx_TK.device)
    return active_TK.float()


def _token_groups(T: int, seq_len: int | None, segment_ids: torch.Tensor | None,
                  device: torch.device) -> tuple[torch.Tensor, int]:
    """Each token's group for the expert-level loss, and the number of groups: one group (batch-level); its
    sequence of seq_len tokens (sequence-wise); or, in packed rows (segment_ids), its example within the row,
    since a packed example is the sequence. Padding (segment -1) joins a group it never counts in (inactive)."""
    if seq_len is None:
        return torch.zeros(T, dtype=torch.long, device=device), 1
    sequence = torch.arange(T, device=device) // seq_len
    if segment_ids is None:
        return sequence, T // seq_len
    return sequence * seq_len + segment_ids.reshape(-1).clamp_min(0), T


def _mean_probs(probs_TE: torch.Tensor, active_TK: torch.Tensor | None, group_T: torch.Tensor | None = None,
                groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """P: the mean affinity over the tokens that count (those with a used slot: padding has none), per group
    -> ((groups, E) fp32, the tokens counted per group (groups,))."""
    T, E = probs_TE.shape
    counted_T = torch.ones(T, device=probs_TE.device) if active_TK is None else active_TK.any(dim=-1).float()
    if group_T is None:
        group_T = torch.zeros(T, dtype=torch.long, device=probs_TE.device)
    sums = torch.zeros(groups, E, device=probs_TE.device).index_add_(0, group_T, probs_TE.float() * counted_T[:, None])
    tokens = torch.zeros(groups, device=probs_TE.device).index_add_(0, group_T, counted_T)
    return sums / tokens.clamp_min(1)[:, None], tokens


def expert_balance_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, alpha: float, seq_len: int | None = None,
    active_TK: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert-level loss. `seq_len` set: computed per sequence of that length and averaged (DeepSeek's
    `seq_aux`, V3's sequence-wise loss), per packed example when `segment_ids` mark them; None: over the whole
    batch of tokens.

    f_i = E / (K * T) * #(tokens choosing i) uses the experts actually selected (after group limits); under
    adaptive routing K * T is the number of decisions actually used (`active_TK`). Groups without a counted
    token (none in a batch without whole rows of padding) are left out of the mean.
    """
    T, E = probs_TE.shape
    group_T, groups = _token_groups(T, seq_len, segment_ids, probs_TE.device)
    used_TK = _slot_weights(topk_idx_TK, active_TK)
    cells = (group_T[:, None] * E + topk_idx_TK).flatten()
    counts_GE = torch.zeros(groups * E, device=probs_TE.device).index_add_(0, cells, used_TK.flatten())
    decisions_G = torch.zeros(groups, device=probs_TE.device).index_add_(0, group_T, used_TK.sum(dim=1))
    f_GE = counts_GE.view(groups, E) * (E / decisions_G.clamp_min(1))[:, None]
    P_GE, tokens_G = _mean_probs(probs_TE, active_TK, group_T, groups)
    present_G = (tokens_G > 0).float()
    return alpha * ((f_GE * P_GE).sum(dim=1) * present_G).sum() / present_G.sum().clamp_min(1)


def device_balance_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, expert_device_E: torch.Tensor, num_devices: int,
    alpha: float, active_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Device-level loss (DeepSeekMoE eq. 15-17): f'_d = mean of f_j over d's experts, P'_d = sum of P_j.
    expert_device_E maps each expert to its device; num_devices is passed so nothing is read back from the GPU."""
    T, E = probs_TE.shape
    D = num_devices
    used = _slot_weights(topk_idx_TK, active_TK).flatten()
    f_E = torch.zeros(E, device=probs_TE.device).scatter_add_(
        0, topk_idx_TK.flatten(), used) * (E / used.sum().clamp_min(1))
    P_E = _mean_probs(probs_TE, active_TK)[0][0]
    experts_per_device = torch.zeros(D, device=probs_TE.device).scatter_add_(
        0, expert_device_E, torch.ones(E, device=probs_TE.device))
    f_D = torch.zeros(D, device=probs_TE.device).scatter_add_(0, expert_device_E, f_E) / experts_per_device
    P_D = torch.zeros(D, device=probs_TE.device).scatter_add_(0, expert_device_E, P_E)
    return alpha * (f_D * P_D).sum()


def communication_balance_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, expert_device_E: torch.Tensor, num_devices: int,
    max_devices: int, alpha: float, active_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Communication loss (V2 eq. 29-31): f''_d = D / (M T) * #(tokens sent to device d), P''_d as above."""
    T, E = probs_TE.shape
    D = num_devices
    sent_TD = torch.zeros(T, D, device=probs_TE.device)
    # a token counts once per device it reaches (amax: an unused slot never clears a used one)
    sent_TD.scatter_reduce_(1, expert_device_E[topk_idx_TK], _slot_weights(topk_idx_TK, active_TK), "amax")
    tokens = T if active_TK is None else active_TK.any(dim=-1).sum().clamp_min(1)
    f_D = sent_TD.sum(dim=0) * D / (max_devices * tokens)
    P_E = _mean_probs(probs_TE, active_TK)[0][0]
    P_D = torch.zeros(D, device=probs_TE.device).scatter_add_(0, expert_device_E, P_E)
    return alpha * (f_D * P_D).sum()


def expert_count_loss(
    scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, top_p: float, min_k: int, target: float, alpha: float,
    active_TK: torch.Tensor | None = None, temperature: float = 0.05,
) -> torch.Tensor:
    """Adaptive routing's regulariser: alpha * (mean soft expert count - target)^2. A slot's soft use is
    sigmoid((top_p - mass before it) / temperature), the differentiable twin of the hard rule in
    `route`, so the gradient makes the affinities peakier when tokens use too many experts and flatter when
    they use too few. The mean is over the tokens with a used slot in active_TK (padding has none)."""
    from dsmoe.model.router import adaptive_cumulative

    soft = torch.sigmoid((top_p - adaptive_cumulative(scores_TE.float(), topk_idx_TK)) / temperature)
    first = torch.arange(topk_idx_TK.shape[1], device=soft.device) < min_k
    count = torch.where(first, torch.ones_like(soft), soft).sum(dim=-1)
    if active_TK is not None:
        counted = active_TK.any(dim=-1).float()
        return alpha * ((count * counted).sum() / counted.sum().clamp_min(1) - target) ** 2
    return alpha * (count.mean() - target) ** 2


@torch.no_grad()
def update_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free balancing: b_i += gamma * sign(mean(c) - c_i), from one whole step's counts."""
    c = counts_E.float()
    bias_E.add_(gamma * torch.sign(c.mean() - c))


def max_violation(counts_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load; 0 under perfect balance. Works per row of (L, E)."""
    c = counts_E.float()
    mean = c.mean(dim=-1).clamp_min(1e-9)
    return (c.amax(dim=-1) - mean) / mean


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on x in forward; in backward the aux loss receives gradient 1, so it joins the training
    loss without being returned through every layer (DeepSeek's trick)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype, ctx.aux_shape = aux.dtype, aux.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)
