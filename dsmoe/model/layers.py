"""Building blocks shared by every DeepSeek version: RMSNorm, rotary embeddings (+YaRN), the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig, yarn_mscale
from dsmoe.kernels import ops


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale: the order of the reference code, so bf16 results match
    (`rms_norm_reference`; decode on a GPU runs it as one fused kernel, see ops.rms_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary embedding and the factor applied to cos/sin.

    YaRN (DeepSeek's rope_scaling) blends interpolated and original frequencies over a ramp between the
    dimensions that rotate beta_fast and beta_slow times over the original context; its attention
    temperature goes into the softmax scale (ModelConfig.softmax_scale) and, when mscale differs from
    mscale_all_dim, into cos/sin. Same formulas as the hub code and transformers' _compute_yarn_parameters.
    """
    dim, base = config.rope_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor = rs.get("factor") or config.max_position_embeddings / rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    original = rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference codes' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = keep the original frequency (high-frequency dims), 0 = interpolate
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, m) / yarn_mscale(factor, m_all)) if (m and m_all) \
            else yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin per position. `interleaved` rotates pairs (2i, 2i+1) as MLA checkpoints expect; otherwise
    the Llama layout rotates dim i with dim i + d/2 (the 16B MHA model)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.rope_dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.inv_freq.is_meta:
            return
        inv_freq, self.attention_factor = rope_inv_freq(self.config)
        self.inv_freq.copy_(inv_freq)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) or (S,) -> cos, sin of shape (..., S, rope_dim // 2), fp32."""
        angles = positions.float()[..., None] * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the merged shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
