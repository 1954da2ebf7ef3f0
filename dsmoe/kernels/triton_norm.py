"""RMSNorm in one kernel for inference: the reference (`rms_norm_reference`) is eight kernels per call in eager
PyTorch (cast, square, mean, add, rsqrt, multiply, cast back, scale), and a decode step runs two to four norms
per layer. One program per row reads x once, reduces in fp32 and writes weight * normed, with the reference's
rounding: normalised in fp32, rounded to x's dtype, then scaled (the order transformers and DeepSeek use).

Forward only: `ops.rms_norm` takes it on CUDA when no gradient is wanted and torch.compile is not tracing
(inductor fuses the reference itself); training keeps the reference and its autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim, in the dtype weight * x would have (no autograd)."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not fit x's last dim {D}")
    rows = x.reshape(-1, D)  # a view where it can be (MLA's latent is a slice of a wider row)
    if D and rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0] and D:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, D, rows.stride(0), eps, BLOCK_D=block,
                                           num_warps=min(16, max(1, block // 512)))
    return out.view(x.shape)
