"""Weight-only low precision for inference: FP8 e4m3 with 128x128 block scales (DeepSeek-V3's native format)
and int8 with one scale per output channel. Activations stay in the model's dtype.

Formats (W = dequantised weight, q = stored codes):
  fp8:  W[i, j] = q[i, j] * scale[i // 128, j // 128]   q float8_e4m3fn, |q| <= 448; scale = the checkpoint's
        `weight_scale_inv` (DeepSeek names the multiplier that way), so a V3 FP8 checkpoint is used as stored.
  int8: W[i, j] = q[i, j] * scale[i]                    q int8 in [-127, 127], symmetric.
Both codes are exact in bf16 (3 and 7 mantissa bits), so a kernel may multiply bf16(q) by the activations and
apply the scale to the fp32 product.

`quantize_model(model, scheme)` swaps, from outside the model code (as expert parallelism swaps the experts),
every projection of attention, dense MLPs and shared experts for `QuantLinear` and every routed-expert stack
for `QuantExperts`. The router (fp32 by design), the embedding, lm_head and MLA's kv_b_proj (read as a matrix
by the weight-absorbed decode) stay as they are, as in DeepSeek-V3's FP8 release. The maths of both modules is
`dequantize` followed by the plain path; `dsmoe.kernels.ops` runs it through fused Triton kernels on a GPU
for the few-token shapes of decode, where reading fewer bytes is the whole point.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.errors import UserError

SCHEMES = ("fp8", "int8")
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
SKIPPED_LINEARS = ("kv_b_proj",)  # the absorbed MLA decode reads this weight as a matrix


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (q float8_e4m3fn [..., N, K], scale fp32 [..., ceil(N/block), ceil(K/block)])."""
    *lead, N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    padded = w.new_zeros(*lead, nb * block, kb * block, dtype=torch.float32)
    padded[..., :N, :K] = w.float()
    tiles = padded.view(*lead, nb, block, kb, block)
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(*lead, nb * block, kb * block)[..., :N, :K].contiguous(), scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (q int8 [..., N, K], scale fp32 [..., N]), one symmetric scale per output row."""
    scale = (w.float().abs().amax(dim=-1) / INT8_MAX).clamp(min=1e-12)
    q = torch.round(w.float() / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8(w) if check_scheme(scheme) == "fp8" else quantize_int8(w)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
               block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)) -> torch.Tensor:
    """The weight the codes stand for, [..., N, K] in `dtype` (the reference every kernel is tested against).
    The scheme follows from the codes' dtype; fp8 edge blocks may be partial."""
    if q.dtype == torch.int8:
        return (q.float() * scale.float()[..., None]).to(dtype)
    N, K = q.shape[-2:]
    s = scale.float().repeat_interleave(block[0], -2)[..., :N, :].repeat_interleave(block[1], -1)[..., :K]
    return (q.float() * s).to(dtype)


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
        return cls(*quantize(linear.weight.detach(), scheme), linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dsmoe.kernels import ops

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
        return cls(quantize(experts.gate_up_proj.detach(), scheme), quantize(experts.down_proj.detach(), scheme))

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                impl: str) -> torch.Tensor:
        """impl: the layer's resolved implementation, for the dequantised (prefill) path."""
        from dsmoe.kernels import ops

        return ops.quant_moe_experts(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.gate_up_proj_scale,
                                     self.down_proj, self.down_proj_scale, impl)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Swap the projections and routed experts of `model` (a dsmoe Transformer) for quantized ones, in place.
    Inference only: the quantized weights are buffers, not parameters."""
    check_scheme(scheme)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Experts" and hasattr(child, "gate_up_proj"):
                setattr(parent, name, QuantExperts.from_experts(child, scheme))
            elif isinstance(child, nn.Linear) and name not in SKIPPED_LINEARS and name != "lm_head":
                setattr(parent, name, QuantLinear.from_linear(child, scheme))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer: what the weights take in memory."""
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if n in model.state_dict()]
    return sum(t.numel() * t.element_size() for t in tensors)
