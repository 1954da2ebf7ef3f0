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


def expert_balance_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, alpha: float, seq_len: int | None = None
) -> torch.Tensor:
    """Expert-level loss. `seq_len` set: computed per sequence of that length and averaged (DeepSeek's
    `seq_aux`, V3's sequence-wise loss); None: over the whole batch of tokens.

    f_i = E / (K * T) * #(tokens choosing i) uses the experts actually selected (after group limits).
    """
    T, E = probs_TE.shape
    K = topk_idx_TK.shape[1]
    S = T if seq_len is None else seq_len
    B = T // S
    counts_BE = torch.zeros(B, E, device=probs_TE.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, topk_idx_TK.reshape(B, S * K), torch.ones(B, S * K, device=probs_TE.device))
    f_BE = counts_BE * (E / (S * K))
    P_BE = probs_TE.float().reshape(B, S, E).mean(dim=1)
    return alpha * (f_BE * P_BE).sum(dim=1).mean()


def device_balance_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, expert_device_E: torch.Tensor, num_devices: int,
    alpha: float,
) -> torch.Tensor:
    """Device-level loss (DeepSeekMoE eq. 15-17): f'_d = mean of f_j over d's experts, P'_d = sum of P_j.
    expert_device_E maps each expert to its device; num_devices is passed so nothing is read back from the GPU."""
    T, E = probs_TE.shape
    K = topk_idx_TK.shape[1]
    D = num_devices
    f_E = torch.zeros(E, device=probs_TE.device).scatter_add_(
        0, topk_idx_TK.flatten(), torch.ones(T * K, device=probs_TE.device)) * (E / (T * K))
    P_E = probs_TE.float().mean(dim=0)
    experts_per_device = torch.zeros(D, device=probs_TE.device).scatter_add_(
        0, expert_device_E, torch.ones(E, device=probs_TE.device))
    f_D = torch.zeros(D, device=probs_TE.device).scatter_add_(0, expert_device_E, f_E) / experts_per_device
    P_D = torch.zeros(D, device=probs_TE.device).scatter_add_(0, expert_device_E, P_E)
    return alpha * (f_D * P_D).sum()


def communication_balance_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, expert_device_E: torch.Tensor, num_devices: int,
    max_devices: int, alpha: float,
) -> torch.Tensor:
    """Communication loss (V2 eq. 29-31): f''_d = D / (M T) * #(tokens sent to device d), P''_d as above."""
    T, E = probs_TE.shape
    D = num_devices
    sent_TD = torch.zeros(T, D, device=probs_TE.device)
    sent_TD.scatter_(1, expert_device_E[topk_idx_TK], 1.0)  # a token counts once per device it reaches
    f_D = sent_TD.sum(dim=0) * (D / (max_devices * T))
    P_D = torch.zeros(D, device=probs_TE.device).scatter_add_(0, expert_device_E, probs_TE.float().mean(dim=0))
    return alpha * (f_D * P_D).sum()


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
