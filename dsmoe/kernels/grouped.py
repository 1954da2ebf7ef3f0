"""The torch grouped path: rows sorted by expert, one grouped GEMM per projection, fp32 combine.

Everything stays on the device: the plan (`permute_reference`, the one permutation spec) is built with
argsort/cumsum (no .item()/.tolist()), so the
layer can be captured in a CUDA graph. `torch.nn.functional.grouped_mm` does the expert GEMMs where the
device and dtype support it (see `grouped_mm_supported`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsmoe.kernels.reference import combine_reference, permute_reference, swiglu

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _GatherRows(torch.autograd.Function):
    """out = src[index], where each src row r is read by exactly the `group` out rows inverse[r*group :
    (r+1)*group] (tokens repeated K times, or a permutation with group 1). The backward gathers those rows
    and sums them (`combine_reference`): no atomics, so it is deterministic, and on CUDA it replaces
    index_select's backward (index_add with bf16 atomics), which measured 27% of this layer's time on an H200."""

    @staticmethod
    def forward(ctx, src, index, inverse, group):
        ctx.save_for_backward(inverse)
        ctx.group = group
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return combine_reference(grad, inverse, ctx.group).to(grad.dtype), None, None, None


def gather_rows(src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, group: int) -> torch.Tensor:
    return _GatherRows.apply(src, index, inverse, group)


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether grouped_mm takes these tensors computed in `dtype` (default x's): rows of 16-byte multiples
    (both builds require it) and, on CUDA, bf16 on SM >= 9.0 (the fused CUTLASS kernel); on the CPU any
    float dtype, but only bf16 under torch.compile: its fake (meta) kernel applies CUDA's bf16 rule, so tracing
    an fp32 CPU model failed (`dsmoe train --compile` on the CPU) where eager runs."""
    dtype = dtype or x.dtype
    if _grouped_mm is None or x.device.type not in ("cuda", "cpu"):
        return False
    if not x.is_cuda and dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False
    if not all(t.shape[-1] * dtype.itemsize % 16 == 0 for t in (x, *weights)):
        return False
    return not x.is_cuda or (dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM: [N, I] x [E, I, O] -> [N, O] (row groups), or [I, N] x [N, O] -> [E, I, O]
    (groups along the reduced dimension: a weight gradient)."""
    return _grouped_mm(a, b, offs=offsets_E)


def grouped_linear(x_ND: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Row block e of x (rows offsets[e-1]:offsets[e]) times w[e]^T; [N, I] -> [N, O]."""
    return grouped_mm(x_ND, w_EOI.transpose(-2, -1), offsets_E)


def moe_experts_grouped(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor,
) -> torch.Tensor:
    T, K = topk_idx_TK.shape
    if T == 0:  # an empty batch (e.g. a rank that received no tokens): grouped_mm rejects empty inputs
        return torch.zeros_like(x_TD)
    order_N, inverse_N, offsets_E = permute_reference(topk_idx_TK, gate_up_EFD.shape[0])
    x_ND = gather_rows(x_TD, order_N // K, inverse_N, K)
    h_NF = swiglu(grouped_linear(x_ND, gate_up_EFD, offsets_E))
    y_ND = grouped_linear(h_NF, down_EDF, offsets_E)
    # Back to (token, k) order with a gather (deterministic), then the weighted sum in fp32.
    y_TKD = gather_rows(y_ND, inverse_N, order_N, 1).view(T, K, -1)
    y_TD = (y_TKD.float() * topk_weight_TK.float().unsqueeze(-1)).sum(dim=1)
    return y_TD.to(x_TD.dtype)
