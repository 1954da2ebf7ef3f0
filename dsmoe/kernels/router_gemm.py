"""Router logits in fp32 from bf16 tensor cores: logits = x @ W^T for bf16 x and an fp32 (or bf16) W.

DeepSeek routes on fp32 logits. A plain fp32 GEMM runs on the CUDA cores (~50 TFLOP/s), which made the
router 5-8% of an MoE layer's forward+backward on an H200. But an fp32 number is exactly the sum of three
bf16 numbers (8 + 8 + 8 significant bits = fp32's 24), a product of two bf16 numbers is exact in fp32,
and cuBLAS accumulates bf16 products in fp32. So

    x @ W^T = x @ W1^T + x @ W2^T + x @ W3^T,   W = W1 + W2 + W3 (each bf16)

is the fp32 GEMM up to the order of summation (measured on an H200: 2e-6 relative to torch's fp32 GEMM,
at 5-6x its speed; the GPU test holds both within 1e-5 of float64). The backward is split the same way:
- d W = d logits^T @ x: d logits (fp32) in three bf16 parts, exact as above.
- d x = d logits @ W: the six part products L_i W_j with i + j <= 4 (the rest are below fp32's
  precision), so d x is the fp32 result before its rounding to x's bf16.
Each is one GEMM over the parts stacked along the reduced dimension. `ops.router_logits` picks it on CUDA
for bf16 x; `router_logits_reference` (F.linear in fp32) is the spec and the path everywhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor


def split_bf16(t: Tensor, parts: int) -> list[Tensor]:
    """bf16 tensors whose fp32 sum is t (exactly for parts=3, barring underflow of the smallest part)."""
    out, rest = [], t.float()
    for _ in range(parts):
        part = rest.to(torch.bfloat16)
        out.append(part)
        rest = rest - part.float()
    return out


def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for bf16 a, b with fp32 accumulation and output (cuBLAS on CUDA; exact fp32 maths elsewhere)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _weight_parts(weight_ED: Tensor) -> int:
    return 1 if weight_ED.dtype == torch.bfloat16 else 3


def logits_forward(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    parts = split_bf16(weight_ED, _weight_parts(weight_ED))
    T, E = x_TD.shape[0], weight_ED.shape[0]
    return mm_fp32(x_TD, torch.cat(parts).t()).view(T, len(parts), E).sum(1)


def logits_backward(d_logits_TE: Tensor, x_TD: Tensor, weight_ED: Tensor) -> tuple[Tensor, Tensor]:
    """(d x in x's dtype, d W in W's dtype)."""
    E, D = weight_ED.shape
    l1, l2, l3 = split_bf16(d_logits_TE, 3)
    d_weight = mm_fp32(torch.cat([l1, l2, l3], dim=1).t(), x_TD).view(3, E, D).sum(0)
    w_parts = split_bf16(weight_ED, _weight_parts(weight_ED))
    if len(w_parts) == 1:
        d_x = mm_fp32(torch.cat([l1, l2, l3], dim=1), torch.cat([w_parts[0]] * 3))
    else:
        w1, w2, w3 = w_parts
        d_x = mm_fp32(torch.cat([l1, l1, l2, l1, l3, l2], dim=1), torch.cat([w1, w2, w1, w3, w1, w2]))
    return d_x.to(x_TD.dtype), d_weight.to(weight_ED.dtype)


@torch.library.custom_op("dsmoe::router_logits", mutates_args=())
def _router_logits_op(x: Tensor, weight: Tensor) -> Tensor:
    return logits_forward(x, weight)


@_router_logits_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("dsmoe::router_logits_bwd", mutates_args=())
def _router_logits_bwd_op(d_logits: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return logits_backward(d_logits, x, weight)


@_router_logits_bwd_op.register_fake
def _(d_logits, x, weight):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, d_logits):
    x, weight = ctx.saved_tensors
    d_x, d_weight = torch.ops.dsmoe.router_logits_bwd(d_logits.contiguous(), x, weight)
    return d_x, d_weight


_router_logits_op.register_autograd(_backward, setup_context=_setup)


def split_router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """fp32 logits [T, E] from the split bf16 GEMMs, differentiable in x and W (bf16 x; fp32 or bf16 W)."""
    return torch.ops.dsmoe.router_logits(x_TD.contiguous(), weight_ED)
