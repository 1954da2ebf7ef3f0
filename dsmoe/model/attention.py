"""Attention: MHA/GQA (DeepSeekMoE 16B) and Multi-head Latent Attention (DeepSeek-V2/V3).

Both project, apply rotary embeddings, then attend. Without a KV cache they attend causally over the sequence
with expanded keys/values (training, plain forwards). With one, the module stores its new tokens through the
cache's per-layer view and attends over what the view hands back, choosing the path itself, as DeepSeek-V3's
own inference code keeps its naive and absorbed paths in one class:
- prefill (the view has `start`): the queries at positions start.. attend causally over the cached prefix,
  with MLA's K/V expanded through kv_b_proj once (cheaper than absorption for many queries);
- decode (the view has `decode_mask`): S queries per row (1, or 1 + drafts when speculative decoding verifies);
  MLA absorbs kv_b_proj into the query and the output (spec section 6.3) and never expands the cache.

The cache only stores: the module says what one token's entry looks like (`cache_shapes`), and the view
writes new entries and returns the windows to attend over (see dsmoe/infer/cache.py for the view protocol).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.kernels import ops
from dsmoe.model.layers import RMSNorm
from dsmoe.model.packed_attention import PackedLayout, packed_attention, padded_value


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int = 0,
                     packing: PackedLayout | None = None) -> torch.Tensor:
    """S queries at positions start..start+S-1 over keys 0..start+S-1: (B, H, S, Dqk), (B, H, T, Dqk),
    (B, H, T, Dv) -> (B, H, S, Dv); softmax in fp32 inside SDPA. With packing (packed rows, no cache) each
    example attends causally within itself (packed_attention.py).

    MLA's value width (128) differs from its query/key width (192). SDPA handles that directly; padding v
    to 192 to reach the flash kernel was measured slower on an H200 (fwd+bwd, B=8, S=2048, 16 heads,
    bf16: 1.89 ms as is, 2.86 ms padded). With an explicit mask (a cached prefix) v is padded so every SDPA
    backend takes one head width.
    """
    if packing is not None:
        return packed_attention(q, k, v, scale, packing)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    S, T = q.shape[2], k.shape[2]
    keys, queries = torch.arange(T, device=q.device), torch.arange(start, start + S, device=q.device)
    attn_mask = keys[None, :] <= queries[:, None]
    return F.scaled_dot_product_attention(q, k, padded_value(v, q.shape[-1]), attn_mask=attn_mask,
                                          scale=scale)[..., :v.shape[-1]]


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

    # The cache holds per token the normalised latent and the roped shared key, side by side: C + R values
    # (576 at V2/V3 shapes), token-major.
    cache_seq_dim = 1

    def cache_shapes(self, slots: int, length: int) -> list[tuple[int, ...]]:
        return [(slots, length, self.kv_lora_rank + self.rope_dim)]

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
        q_pe = ops.apply_rotary(q_pe, cos, sin, self.interleaved)
        return q_nope, q_pe, latent, ops.apply_rotary(k_pe, cos, sin, self.interleaved)

    def expand_kv(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, T, C), k_pe (B, 1, T, rope) -> keys (B,H,T,nope+rope), values (B,H,T,v)."""
        B, T, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, T, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, self.num_heads, T, self.rope_dim)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None,
                packing: PackedLayout | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        q_nope, q_pe, latent, k_pe = self.project(x, cos, sin)
        if kv is not None:
            (cached,) = kv.update(torch.cat([latent, k_pe[:, 0]], dim=-1))  # (B, T, C + R)
            if kv.decode_mask is not None:
                return self.o_proj(self.absorbed_decode(q_nope, q_pe, cached, kv.decode_mask))
            latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            k_pe = k_pe[:, None]
        k, v = self.expand_kv(latent, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1).to(k.dtype)
        out = causal_attention(q, k, v, self.softmax_scale, 0 if kv is None else kv.start, packing)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))

    def absorbed_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                        masked: torch.Tensor) -> torch.Tensor:
        """S queries per row over the compressed cache, never expanding it. With W = kv_b_proj.weight viewed
        (H, nope + v, C):  q_lat_h = q_nope_h W_UK_h;  score_t = [q_lat_h ; q_pe_h] . [c_t ; k_pe_t] * scale;
        o_h = (sum_t p_t c_t) W_UV_h^T. A step reads C + R values per cached token for all heads at once.
        q_nope (B,H,S,nope), q_pe (B,H,S,R), kv (B,L,C+R), masked (B,S,L) or (B,L), True = hidden -> (B,S,H*v)."""
        B, H, S = q_nope.shape[:3]
        C = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, C)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # (H, nope, C), (H, v, C): views, no copies
        q_lat = torch.matmul(q_nope.transpose(0, 1).reshape(H, B * S, -1), w_uk)  # (H, B*S, C)
        q_lat = q_lat.view(H, B, S, C).transpose(0, 1)  # (B, H, S, C)
        o_lat = ops.mla_decode_attention(q_lat, q_pe, kv, masked, self.softmax_scale).reshape(H, B * S, C)
        out = torch.matmul(o_lat.to(w_uv.dtype), w_uv.transpose(1, 2))  # (H, B*S, v)
        return out.view(H, B, S, self.v_dim).permute(1, 2, 0, 3).reshape(B, S, H * self.v_dim)


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

    # Roped keys and values per kv-head, head-major, so a decode batch's (B, Hkv) dims fold into one strided
    # batch for the matmuls without a copy.
    cache_seq_dim = 2

    def cache_shapes(self, slots: int, length: int) -> list[tuple[int, ...]]:
        return [(slots, self.kv_heads, length, self.head_dim)] * 2

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, S, D) -> q (B,H,S,hd), k and v (B,Hkv,S,hd), q and k roped."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        return ops.apply_rotary(q, cos, sin, self.interleaved), ops.apply_rotary(k, cos, sin, self.interleaved), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None,
                packing: PackedLayout | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)
            q = q.to(k.dtype)
            if kv.decode_mask is not None:
                return self.o_proj(self.decode(q, k, v, kv.decode_mask))
        if self.kv_heads != self.num_heads:
            rep = self.num_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = causal_attention(q, k, v, self.softmax_scale, 0 if kv is None else kv.start, packing)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """q (B,H,S,hd), cached k and v (B,Hkv,L,hd), masked (B,S,L) or (B,L) -> (B, S, H*hd). Query head h reads
        kv head h // (H / Hkv), as the expanded path's repeat_interleave does, without repeating the cache."""
        B, H, S, hd = q.shape
        rep = H // self.kv_heads
        qg = q.reshape(B, self.kv_heads, rep * S, hd)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float().view(B, self.kv_heads, rep, S, -1) * self.softmax_scale
        masked = masked.view(B, -1, masked.shape[-1])  # (B, L) is taken as (B, 1, L)
        probs = scores.masked_fill(masked[:, None, None], float("-inf")).softmax(dim=-1).to(v.dtype)
        out = torch.matmul(probs.view(B, self.kv_heads, rep * S, -1), v)  # (B, Hkv, rep*S, hd)
        return out.view(B, H, S, hd).transpose(1, 2).reshape(B, S, H * hd)


def build_attention(config: ModelConfig) -> nn.Module:
    return MLAttention(config) if config.use_mla else MHAttention(config)
