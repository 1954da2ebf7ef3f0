"""SwiGLU backward of the routed rows, one pass over [N, F], with the gate-weight gradient.

For each expert-sorted row r (decision t*K+k, gate weight w = topk_weight[t, k]) with pre-activations
gu_r = [g | u] saved by the forward and dh_r = dy_t @ down_e (the unweighted gradient of h):

    h       = silu(g) * u                                   (recomputed, never stored by the forward)
    dw_r    = <dh_r, h>                                     d topk_weight[t, k], fp32, one store per row
    dgu_r   = w * dh * [silu'(g) * u | silu(g)]            the gradient of gu, for dX and d gate_up
    hw_r    = w * h                                         what d down = dy_e^T @ hw_e needs

A pass of its own rather than the epilogue of the dh GEMM: there its six live fp32 tiles spill registers
and held that GEMM to ~170 TFLOP/s on an H200 (0.3 of the same GEMM without them); alone it costs one read
of dh and gu and one write of dgu and hw, and the row sums of dw need no atomics, so they are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_backward_kernel(dh_ptr, gu_ptr, order_ptr, w_ptr, dgu_ptr, hw_ptr, dw_ptr, N, F,
                            HAS_DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    flat = tl.load(order_ptr + rows, mask=row_ok, other=0)
    w = tl.load(w_ptr + flat, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    dtype = dgu_ptr.dtype.element_ty
    dw = tl.zeros((BLOCK_R,), tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        ok = row_ok[:, None] & (cols < F)[None, :]
        g = tl.load(gu_ptr + rows64 * (2 * F) + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + rows64 * (2 * F) + F + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows64 * F + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        h = silu * u
        if HAS_DW:
            dw += tl.sum(dh * h, axis=1)
        dhw = dh * w
        tl.store(dgu_ptr + rows64 * (2 * F) + cols[None, :], (dhw * u * sig * (1.0 + g * (1.0 - sig))).to(dtype),
                 mask=ok)
        tl.store(dgu_ptr + rows64 * (2 * F) + F + cols[None, :], (dhw * silu).to(dtype), mask=ok)
        tl.store(hw_ptr + rows64 * F + cols[None, :], (h * w).to(dtype), mask=ok)
    if HAS_DW:
        tl.store(dw_ptr + flat, dw, mask=row_ok)


def swiglu_backward(dh_NF: torch.Tensor, gu_N2F: torch.Tensor, order_N: torch.Tensor, weight_flat: torch.Tensor,
                    need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dgu_N2F, hw_NF, dw_flat fp32 or None); rows in expert-sorted order, dw indexed by decision t*K+k."""
    N, F = dh_NF.shape
    if gu_N2F.shape != (N, 2 * F) or not (dh_NF.is_contiguous() and gu_N2F.is_contiguous()):
        raise ValueError(f"swiglu_backward wants contiguous dh [N, F] and gu [N, 2F], got {tuple(dh_NF.shape)} "
                         f"and {tuple(gu_N2F.shape)}")
    dgu = torch.empty_like(gu_N2F)
    hw = torch.empty_like(dh_NF)
    dw = torch.empty(weight_flat.numel(), dtype=torch.float32, device=dh_NF.device) if need_dw else None
    if N == 0 or F == 0:
        if dw is not None:
            dw.zero_()
        return dgu, hw, dw
    block_f = min(128, triton.next_power_of_2(F))
    block_r = max(1, 4096 // block_f)
    _swiglu_backward_kernel[(triton.cdiv(N, block_r),)](
        dh_NF, gu_N2F, order_N, weight_flat, dgu, hw, dw if dw is not None else weight_flat, N, F,
        HAS_DW=need_dw, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=8)
    return dgu, hw, dw
