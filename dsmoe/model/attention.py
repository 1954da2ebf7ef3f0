"""Attention: MHA/GQA (DeepSeekMoE 16B) and Multi-head Latent Attention (DeepSeek-V2/V3).

Both project, apply rotary embeddings, then attend. Training and plain forwards attend causally over the
sequence with expanded keys/values. A KV cache is passed in, never owned: when one is given, the attend
step is the cache's (`cache.attend_mla` / `cache.attend_mha`), so the serving code can store MLA's
compressed latent (kv_lora_rank + qk_rope_head_dim values per token) and decode with weight absorption
without the model knowing about slots or batching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.model.layers import RMSNorm, apply_rotary


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, S, Dqk), (B, H, S, Dqk), (B, H, S, Dv) -> (B, H, S, Dv); softmax in fp32 inside SDPA.

    MLA's value width (128) differs from its query/key width (192). SDPA handles that directly; padding v
    to 192 to reach the flash kernel was measured slower on an H200 (fwd+bwd, B=8, S=2048, 16 heads,
    bf16: 1.89 ms as is, 2.86 ms padded).
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.softmax_scale = c.softmax_scale
        self.interleaved = c.rope_interleaved
        q_out = self.num_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * c.v_head_dim, c.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, S, D) -> q_nope (B,H,S,nope), q_pe (B,H,S,rope) roped, latent (B,S,C) normed,
        k_pe (B,1,S,rope) roped: exactly what an MLA cache stores per token (C + rope values)."""
        B, S, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = k_pe.view(B, 1, S, self.rope_dim)
        q_pe = apply_rotary(q_pe, cos, sin, self.interleaved)
        return q_nope, q_pe, latent, apply_rotary(k_pe, cos, sin, self.interleaved)

    def expand_kv(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, T, C), k_pe (B, 1, T, rope) -> keys (B,H,T,nope+rope), values (B,H,T,v)."""
        B, T, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, T, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, self.num_heads, T, self.rope_dim)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        q_nope, q_pe, latent, k_pe = self.project(x, cos, sin)
        if cache is not None:
            out = cache.attend_mla(self, q_nope, q_pe, latent, k_pe)  # (B, S, H * v)
        else:
            k, v = self.expand_kv(latent, k_pe)
            q = torch.cat([q_nope, q_pe], dim=-1)
            out = causal_attention(q, k, v, self.softmax_scale).transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(out)


class MHAttention(nn.Module):
    """Llama-style attention of the DeepSeekMoE 16B model (GQA when num_key_value_heads < heads)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.kv_heads, c.head_dim
        self.softmax_scale = c.softmax_scale
        self.interleaved = c.rope_interleaved
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, S, D) -> q (B,H,S,hd), k and v (B,Hkv,S,hd), q and k roped."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin, self.interleaved), apply_rotary(k, cos, sin, self.interleaved), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            out = cache.attend_mha(self, q, k, v)  # (B, S, H * hd)
        else:
            if self.kv_heads != self.num_heads:
                rep = self.num_heads // self.kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = causal_attention(q, k, v, self.softmax_scale).transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(out)


def build_attention(config: ModelConfig) -> nn.Module:
    return MLAttention(config) if config.use_mla else MHAttention(config)
