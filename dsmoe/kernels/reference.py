"""Plain-PyTorch reference of every MoE op: the spec the fast paths are tested against.

Shape suffixes: T tokens, D model dim, E routed experts, K experts per token, F expert hidden dim,
N = T*K routed rows. Expert weights are stacked as in transformers 5: gate_up_EFD [E, 2F, D] (rows
[gate; up]) and down_EDF [E, D, F], both [out, in] per expert like nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(h_N2F: torch.Tensor) -> torch.Tensor:
    gate, up = h_N2F.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts_reference(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor,
) -> torch.Tensor:
    """y_t = sum_k w_tk * Expert_{idx_tk}(x_t), one expert at a time, accumulated in fp32."""
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(gate_up_EFD.shape[0]):
        token, slot = torch.where(topk_idx_TK == e)
        if token.numel() == 0:
            continue
        h = swiglu(x_TD[token] @ gate_up_EFD[e].t()) @ down_EDF[e].t()
        y_TD = y_TD.index_add(0, token, h.float() * topk_weight_TK[token, slot, None].float())
    return y_TD.to(x_TD.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers and DeepSeek compute it: normalise in fp32, cast back to x's dtype, then scale
    (so bf16 results match theirs bit for bit)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (B, H, S, R) with cos/sin (B, S, R/2) or (S, R/2). Computed in fp32, returned in x's dtype.

    The interleaved form returns the rotated pairs de-interleaved ([evens | odds]), as transformers does;
    q and k go through the same function, so their dot products are those of the checkpoint layout.
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def router_logits_reference(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """DeepSeek's router logits: an fp32 GEMM (the spec of `dsmoe.kernels.router_gemm`)."""
    return F.linear(x_TD.float(), weight_ED.float())


# ---- the steps the fused kernels take, one plain function each (dsmoe.model.router.route is the spec of
# ---- the fused routing kernel) ---------------------------------------------------------------------------

def permute_reference(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one permutation spec (the grouped path runs it, the Triton permute kernel is tested against it):
    rows sorted by expert, ties in (token, k) order. (order_N = flat index t*K+k of each sorted row, inverse_N
    = sorted row of each flat index, offsets_E = inclusive row ends per expert, as grouped_mm takes them), int32.
    On the device throughout (argsort, scatter_add, cumsum): no host sync, so it can be captured."""
    flat = topk_idx_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order.int(), inverse.int(), counts.cumsum(0, dtype=torch.int32)


def expert_rows(offsets_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets_E.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_swiglu_reference(
    x_TD: torch.Tensor, order_N: torch.Tensor, offsets_E: torch.Tensor, gate_up_EFD: torch.Tensor, top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gu_N2F, h_NF) of the sorted rows: gu = x[token] @ gate_up[e]^T, h = SwiGLU(gu)."""
    x_ND = x_TD[order_N.long() // top_k]
    gu = torch.cat([x_ND[a:b] @ gate_up_EFD[e].t() for e, (a, b) in enumerate(expert_rows(offsets_E))])
    return gu, swiglu(gu)


def grouped_linear_reference(a_ND: torch.Tensor, offsets_E: torch.Tensor, w_EOI: torch.Tensor) -> torch.Tensor:
    """Row block of expert e times w[e]^T: [N, I] -> [N, O]."""
    return torch.cat([a_ND[a:b] @ w_EOI[e].t() for e, (a, b) in enumerate(expert_rows(offsets_E))])


def combine_reference(y_ND: torch.Tensor, inverse_N: torch.Tensor, top_k: int,
                      weight_TK: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = sum_k w_tk * y[inverse[t*K+k]] in fp32, or float64 for float64 y (w = 1 when None)."""
    y = y_ND.index_select(0, inverse_N.long()).view(-1, top_k, y_ND.shape[-1])
    acc = torch.promote_types(y.dtype, torch.float32)
    if weight_TK is None:  # summed without an fp32 copy of the gathered rows (the grouped path's backward)
        return y.sum(1, dtype=acc)
    return (y.to(acc) * weight_TK.to(acc).unsqueeze(-1)).sum(1)


def mla_decode_attention_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, hidden: torch.Tensor,
                                   scale: float) -> torch.Tensor:
    """MLA's absorbed decode attention over the compressed cache (spec section 6.3): score_t = [q_lat ; q_pe] .
    [c_t ; k_pe_t] * scale, softmax in fp32 over the positions not hidden, sum_t p_t c_t.
    q_lat (B, H, S, C), q_pe (B, H, S, R), kv (B, L, C + R), hidden (B, S, L) or (B, L) bool, True = not attended
    (a (B, L) mask holds for every query) -> (H, B, S, C) in kv's dtype, head-major."""
    B, H, S, C = q_lat.shape
    q = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).to(kv.dtype).reshape(B, H * S, -1)
    scores = torch.matmul(q, kv.transpose(1, 2)).float().view(B, H, S, -1) * scale
    hidden = hidden.view(B, -1, hidden.shape[-1])
    probs = scores.masked_fill(hidden[:, None], float("-inf")).softmax(dim=-1).to(kv.dtype)
    o_lat = torch.matmul(probs.view(B, H * S, -1), kv[..., :C])
    return o_lat.view(B, H, S, C).transpose(0, 1)
