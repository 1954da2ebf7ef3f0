"""Rotary embedding in one kernel for inference: the reference (`rotary_reference`) is about nine kernels per
call in eager PyTorch (cast, two strided slices, four products, sum and difference, concatenation, cast back),
and a decode step applies it twice per layer. One program per (batch, head, position) row reads the row and
its cos/sin once and writes [x1 cos - x2 sin | x2 cos + x1 sin] in fp32, rounded once to x's dtype.

Forward only: `ops.apply_rotary` takes it on CUDA when no gradient is wanted and torch.compile is not tracing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, S, sxb, sxh, sxs, scb, scs,
                   HALF: tl.constexpr, BLOCK: tl.constexpr, INTERLEAVED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s, h, b = row % S, (row // S) % H, row // (S * H)
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    x_row = x_ptr + b * sxb + h * sxh + s * sxs
    if INTERLEAVED:
        x1 = tl.load(x_row + 2 * i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(x_row + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + i, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + b * scb + s * scs + i, mask=ok, other=0.0)
    sn = tl.load(sin_ptr + b * scb + s * scs + i, mask=ok, other=0.0)
    out_row = out_ptr + row * (2 * HALF)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_row + i, (x1 * c - x2 * sn).to(dtype), mask=ok)
    tl.store(out_row + HALF + i, (x2 * c + x1 * sn).to(dtype), mask=ok)


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (B, H, S, R) (any strides, unit stride along R), cos/sin fp32 (B, S, R/2), (1, S, R/2) or (S, R/2)
    -> contiguous (B, H, S, R) in x's dtype, the rotated pairs de-interleaved as `rotary_reference` returns them."""
    B, H, S, R = x.shape
    batch_ok = cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] in (1, B))
    if R % 2 or not batch_ok or cos.shape[-1] != R // 2 or cos.shape[-2] != S or cos.shape != sin.shape:
        raise ValueError(f"rotary: x {tuple(x.shape)} and cos/sin {tuple(cos.shape)} do not fit (want R/2 = "
                         f"{R // 2} per position)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(B, H, S, R, dtype=x.dtype, device=x.device)
    if out.numel():
        scb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0  # one row of positions for all
        _rotary_kernel[(B * H * S,)](x, cos, sin, out, H, S, x.stride(0), x.stride(1), x.stride(2), scb,
                                     cos.stride(-2), HALF=R // 2, BLOCK=triton.next_power_of_2(R // 2),
                                     INTERLEAVED=interleaved, num_warps=1)
    return out
