"""Weight-only low precision for inference: FP8 e4m3 with 128x128 block scales (DeepSeek-V3's native format)
and int8 with one scale per output channel. Activations stay in the model's dtype.

Formats (W = dequantised weight, q = stored codes):
  fp8:  W[i, j] = q[i, j] * scale[i // 128, j // 128]   q float8_e4m3fn, |q| <= 448; scale = the checkpoint's
        `weight_scale_inv` (DeepSeek names the multiplier that way), so a V3 FP8 checkpoint is used as stored.
  int8: W[i, j] = q[i, j] * scale[i]                    q int8 in [-127, 127], symmetric.
Both codes are exact in bf16 (3 and 7 mantissa bits), so a kernel may multiply bf16(q) by the activations and
apply the scale to the fp32 product.

The modules that hold quantized weights are in `dsmoe.model.quantized`; `dsmoe.kernels.ops` runs their maths
(`dequantize` followed by the plain path) through fused Triton kernels on a GPU at the few-token shapes of
decode, where reading fewer bytes is the whole point.
"""

from __future__ import annotations

import torch

from dsmoe.errors import UserError

SCHEMES = ("fp8", "int8")
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


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
               block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK), offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The weight the codes stand for, [..., N, K] in `dtype` (the reference every kernel is tested against).
    The scheme follows from the codes' dtype; fp8 edge blocks may be partial. offset: for a slice of a larger fp8
    weight, where its first code sits inside its first scale block (`scale` then holds the blocks it touches)."""
    if q.dtype == torch.int8:
        return (q.float() * scale.float()[..., None]).to(dtype)
    (N, K), (r, c) = q.shape[-2:], offset
    s = scale.float().repeat_interleave(block[0], -2)[..., r:r + N, :].repeat_interleave(block[1], -1)[..., c:c + K]
    return (q.float() * s).to(dtype)
