"""The routed experts on Triton kernels: forward and hand-written backward, no host-device sync.

Forward (N = T*K routed rows, sorted by expert; nothing of size N*D is gathered or scattered in torch):
  permute_triton     stable counting sort -> order_N, inverse_N, offsets_E
  SWIGLU rows GEMM   x gathered in the prologue @ gate_up[e]^T -> gu_N2F (saved), h_NF = silu(g) * u
  PLAIN rows GEMM    h_NF @ down[e]^T -> y_ND (unweighted, sorted)
  combine            y_t = sum_k w_tk * y_ND[inverse[t, k]] in fp32 (deterministic, no atomics)

Backward (saved: x, w, weights, gu_N2F and the int32 plan; h is recomputed from gu, never stored):
  dh_NF = dy[tokens] @ down[e]                     rows GEMM (dy gathered)
  swiglu_backward    dgu_N2F = w * SwiGLU'(gu) dh, hw_NF = w * h, d w_tk = <dh, h>
  d down[e]  = dy[tokens of e]^T @ hw_e             weight-gradient GEMM (dy gathered)
  dx_ND = dgu @ gate_up[e]; combine (unweighted) -> dx_TD in fp32
  d gate_up[e] = dgu_e^T @ x[tokens of e]           weight-gradient GEMM (x gathered)

On Hopper in bf16 the three GEMMs with a gathered operand run on torch's grouped_mm (CUTLASS) over one
gathered copy of dy and of x (N*D each, freed at once): measured on an H200, CUTLASS reaches 500-630
TFLOP/s on them where our Triton kernels reach 260-370, which more than pays for the copies. Elsewhere
(other GPUs, fp32/fp16, the CPU interpreter) the Triton kernels gather while loading.

`experts_forward` / `experts_backward` are the raw launchers that the `dsmoe::experts_fwd` / `_bwd` custom
ops in `ops` call; `ops.moe_experts(..., impl="triton")` is the autograd-aware entry.
"""

from __future__ import annotations

import torch

from dsmoe.kernels.grouped import grouped_mm, grouped_mm_supported
from dsmoe.kernels.triton_gemm_rows import PLAIN, SWIGLU, grouped_rows
from dsmoe.kernels.triton_gemm_weights import grouped_weight_grad
from dsmoe.kernels.triton_permute import combine_triton, permute_triton
from dsmoe.kernels.triton_swiglu import swiglu_backward


def check_expert_inputs(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF) -> None:
    """Shapes, dtypes and devices the kernels rely on; one sentence that names what to fix."""
    if x_TD.dim() != 2 or topk_idx_TK.dim() != 2 or gate_up_EFD.dim() != 3 or down_EDF.dim() != 3:
        raise ValueError("moe experts want x [T, D], topk_idx [T, K], gate_up [E, 2F, D], down [E, D, F]")
    T, D = x_TD.shape
    E, F2, D2 = gate_up_EFD.shape
    if topk_idx_TK.shape[0] != T or topk_weight_TK.shape != topk_idx_TK.shape:
        raise ValueError(f"topk_idx {tuple(topk_idx_TK.shape)} and topk_weight {tuple(topk_weight_TK.shape)} "
                         f"must both be [T={T}, K]")
    if D2 != D or F2 % 2 or down_EDF.shape != (E, D, F2 // 2):
        raise ValueError(f"expert weights gate_up {tuple(gate_up_EFD.shape)} / down {tuple(down_EDF.shape)} "
                         f"do not fit x with D={D}: want [E, 2F, D] and [E, D, F]")
    if topk_idx_TK.dtype.is_floating_point or topk_idx_TK.dtype == torch.bool:
        raise ValueError("topk_idx must be an integer tensor of expert ids")
    if not (x_TD.dtype == gate_up_EFD.dtype == down_EDF.dtype) or not topk_weight_TK.dtype.is_floating_point:
        raise ValueError(f"x, gate_up and down must share one float dtype (got {x_TD.dtype}, "
                         f"{gate_up_EFD.dtype}, {down_EDF.dtype}) and topk_weight must be floating point")
    devices = {t.device for t in (x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)}
    if len(devices) != 1:
        raise ValueError(f"all MoE tensors must be on one device, got {sorted(map(str, devices))}")


def experts_forward(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF, save_for_backward: bool):
    """(y_TD, gu_N2F or None, order_N, inverse_N, offsets_E). Token ids must lie in [0, E)."""
    check_expert_inputs(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)
    T, K = topk_idx_TK.shape
    E, F2, D = gate_up_EFD.shape
    x_TD = x_TD.contiguous()
    order, inverse, offsets = permute_triton(topk_idx_TK, E)
    gu = torch.empty(T * K, F2, dtype=x_TD.dtype, device=x_TD.device) if save_for_backward else None
    h = grouped_rows(SWIGLU, x_TD, gate_up_EFD, (gate_up_EFD.stride(2), gate_up_EFD.stride(1)), F2 // 2,
                     order, offsets, K, gather_a=True, gu=gu, store_gu=save_for_backward)
    y_ND = grouped_rows(PLAIN, h, down_EDF, (down_EDF.stride(2), down_EDF.stride(1)), D, order, offsets, K,
                        gather_a=False)
    del h
    y_TD = combine_triton(y_ND, inverse, topk_weight_TK.contiguous(), T, K, x_TD.dtype)
    return y_TD, gu, order, inverse, offsets


def cutlass_backward(x_TD: torch.Tensor, down_EDF: torch.Tensor) -> bool:
    """Whether the gathered-operand backward GEMMs go to torch's grouped_mm: bf16 on compute capability
    9.0 only (on 10.x, grouped_mm's weight gradient of an expert without rows was reported non-zero:
    pytorch/pytorch#172439), with the 16-byte aligned rows CUTLASS needs."""
    return (x_TD.is_cuda and grouped_mm_supported(x_TD, down_EDF)
            and torch.cuda.get_device_capability(x_TD.device) == (9, 0))


def experts_backward(dy_TD, x_TD, topk_weight_TK, gate_up_EFD, down_EDF, gu_N2F, order_N, inverse_N, offsets_E,
                     need_dw: bool, use_grouped_mm: bool | None = None):
    """(dx_TD, d topk_weight_TK or None, d gate_up, d down) from the saved forward state.
    use_grouped_mm: None picks `cutlass_backward(x, down)`; True/False forces a backend (tests)."""
    T, K = topk_weight_TK.shape
    E, F2, D = gate_up_EFD.shape
    dy_TD = dy_TD.to(x_TD.dtype).contiguous()  # autograd may hand an expanded or fp32 gradient
    x_TD = x_TD.contiguous()
    w_flat = topk_weight_TK.reshape(-1).contiguous()
    if use_grouped_mm is None:
        use_grouped_mm = cutlass_backward(x_TD, down_EDF)
    use_grouped_mm = use_grouped_mm and order_N.numel() > 0  # grouped_mm rejects a zero-length K
    if use_grouped_mm:
        token_N = (order_N // K).long()
        dy_ND = dy_TD.index_select(0, token_N)
        dh = grouped_mm(dy_ND, down_EDF, offsets_E)
        dgu, hw, dw_flat = swiglu_backward(dh, gu_N2F, order_N, w_flat, need_dw)
        del dh
        d_down = grouped_mm(dy_ND.t(), hw, offsets_E)
        del dy_ND, hw
    else:
        dh = grouped_rows(PLAIN, dy_TD, down_EDF, (down_EDF.stride(1), down_EDF.stride(2)), F2 // 2,
                          order_N, offsets_E, K, gather_a=True)
        dgu, hw, dw_flat = swiglu_backward(dh, gu_N2F, order_N, w_flat, need_dw)
        del dh
        d_down = grouped_weight_grad(dy_TD, hw, order_N, offsets_E, K, gather_a=True, gather_b=False,
                                     out_dtype=down_EDF.dtype)
        del hw
    dx_ND = grouped_rows(PLAIN, dgu, gate_up_EFD, (gate_up_EFD.stride(1), gate_up_EFD.stride(2)), D,
                         order_N, offsets_E, K, gather_a=False)
    dx_TD = combine_triton(dx_ND, inverse_N, None, T, K, x_TD.dtype)
    del dx_ND
    if use_grouped_mm:
        d_gate_up = grouped_mm(dgu.t(), x_TD.index_select(0, token_N), offsets_E)
    else:
        d_gate_up = grouped_weight_grad(dgu, x_TD, order_N, offsets_E, K, gather_a=False, gather_b=True,
                                        out_dtype=gate_up_EFD.dtype)
    dw = dw_flat.view(T, K).to(topk_weight_TK.dtype) if need_dw else None
    return dx_TD, dw, d_gate_up, d_down

