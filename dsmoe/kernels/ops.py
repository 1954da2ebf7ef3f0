"""The one door from the model to the MoE kernels: `moe_experts(..., impl=...)`.

impl: "reference" (per-expert loop, the spec), "grouped" (torch grouped_mm), "triton" (fused kernels, when
Triton and a GPU are there), or "auto" (the fastest available for these tensors). Chosen per call by the
caller (the model keeps it as a constructor argument), never by a global.
"""

from __future__ import annotations

import torch

from dsmoe.kernels.grouped import grouped_mm_supported, moe_experts_grouped
from dsmoe.kernels.reference import moe_experts_reference

IMPLS = ("auto", "reference", "grouped", "triton")


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from dsmoe.kernels import triton_moe  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, x: torch.Tensor, *weights: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        if triton_available(x.device):
            return "triton"
        return "grouped" if grouped_mm_supported(x, *weights) else "reference"
    if impl == "grouped" and not grouped_mm_supported(x, *weights):
        return "reference"  # same maths; grouped_mm cannot take these tensors (dtype, device, strides)
    return impl


def moe_experts(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor, impl: str = "auto",
) -> torch.Tensor:
    """y_t = sum_k w_tk * SwiGLU-expert_{idx_tk}(x_t) for the routed experts; fp32 combine, x's dtype out
    (the autocast dtype under autocast: like F.linear, the expert GEMMs then run in bf16 on fp32 weights)."""
    if torch.is_autocast_enabled(x_TD.device.type):
        dtype = torch.get_autocast_dtype(x_TD.device.type)
        x_TD, gate_up_EFD, down_EDF = x_TD.to(dtype), gate_up_EFD.to(dtype), down_EDF.to(dtype)
    impl = resolve_impl(impl, x_TD, gate_up_EFD, down_EDF)
    if impl == "triton":
        from dsmoe.kernels.triton_moe import moe_experts_triton

        return moe_experts_triton(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)
    if impl == "grouped":
        return moe_experts_grouped(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)
    return moe_experts_reference(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)
