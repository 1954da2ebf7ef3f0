"""Modules holding weight-only fp8 / int8 weights (formats in `dsmoe.kernels.quant`), for inference.

`quantize_model(model, scheme)` swaps, from outside the model code (as expert parallelism swaps the experts),
every projection of attention, dense MLPs and shared experts for `QuantLinear` and every routed-expert stack for
`QuantExperts`. The router (fp32 by design), the embedding, lm_head and MLA's kv_b_proj (read as a matrix by the
weight-absorbed decode) stay as they are, as in DeepSeek-V3's FP8 release. The quantized weights are buffers,
not parameters: nothing here trains.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.kernels import ops
from dsmoe.model.moe import Experts, plus_shared

SKIPPED_LINEARS = ("kv_b_proj",)  # the absorbed MLA decode reads this weight as a matrix


class QuantLinear(nn.Module):
    """A bias-free nn.Linear whose weight is stored quantized (buffers `weight` codes and `weight_scale`)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.out_dtype = out_dtype
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> QuantLinear:
        if linear.bias is not None:
            raise ValueError("QuantLinear holds bias-free projections only (DeepSeek models have no biases)")
        return cls(*ops.quantize(linear.weight.detach(), scheme), linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_linear(x, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, codes={self.weight.dtype}"


class QuantExperts(nn.Module):
    """The routed experts of one MoE layer with quantized stacks: gate_up [E, 2F, D], down [E, D, F]."""

    def __init__(self, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.register_buffer("gate_up_proj", gate_up[0])
        self.register_buffer("gate_up_proj_scale", gate_up[1])
        self.register_buffer("down_proj", down[0])
        self.register_buffer("down_proj_scale", down[1])

    @classmethod
    def from_experts(cls, experts: nn.Module, scheme: str) -> QuantExperts:
        return cls(ops.quantize(experts.gate_up_proj.detach(), scheme),
                   ops.quantize(experts.down_proj.detach(), scheme))

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                impl: str, shared: nn.Module | None = None, active_TK: torch.Tensor | None = None) -> torch.Tensor:
        """impl: the layer's resolved implementation, for the dequantised (prefill) path; shared: as `Experts`."""
        y_TD = ops.quant_moe_experts(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.gate_up_proj_scale,
                                     self.down_proj, self.down_proj_scale, impl)
        return plus_shared(y_TD, x_TD, shared)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Swap the projections and routed experts of `model` (a dsmoe Transformer) for quantized ones, in place.
    Inference only: the quantized weights are buffers, not parameters."""
    ops.check_scheme(scheme)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Experts):
                setattr(parent, name, QuantExperts.from_experts(child, scheme))
            elif isinstance(child, nn.Linear) and name not in SKIPPED_LINEARS and name != "lm_head":
                setattr(parent, name, QuantLinear.from_linear(child, scheme))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer: what the weights take in memory."""
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if n in model.state_dict()]
    return sum(t.numel() * t.element_size() for t in tensors)
