"""Attention over a KV cache: weight-absorbed MLA decode (spec section 6.3), expanded prefill, and MHA.

MLA decode never expands the cache. With W = kv_b_proj.weight viewed (H, nope + v, C):
    q_lat_h = q_nope_h W_UK_h                    (C wide: W_UK absorbed into the query)
    score   = [q_lat_h ; q_pe_h] . [c_t ; k_pe_t] * softmax_scale      (one shared C + R key per token)
    o_h     = (sum_t p_t c_t) W_UV_h^T            (W_UV absorbed on the output side)
so a step reads C + R values per cached token for all heads at once (MQA-like), instead of H * (nope + rope
+ v). Prefill attends many queries at once, where expanding K/V through kv_b_proj once is cheaper: it uses
the model's own expand_kv, so it is the training forward restricted to a window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsmoe.model.attention import causal_attention


def absorbed_decode(attn, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                    masked: torch.Tensor) -> torch.Tensor:
    """q_nope (B,H,S,nope), q_pe (B,H,S,R): S new tokens per row (1 in plain decoding, 1 + drafts when
    verifying speculative tokens), kv (B,L,C+R) cached [latent | k_pe], masked (B,S,L) True = hidden
    -> (B, S, H*v)."""
    B, H, S = q_nope.shape[:3]
    C = attn.kv_lora_rank
    w = attn.kv_b_proj.weight.view(H, attn.nope_dim + attn.v_dim, C)
    w_uk, w_uv = w[:, : attn.nope_dim], w[:, attn.nope_dim:]  # (H, nope, C), (H, v, C): views, no copies
    q_lat = torch.matmul(q_nope.transpose(0, 1).reshape(H, B * S, -1), w_uk)  # (H, B*S, C)
    q_lat = q_lat.view(H, B, S, C).transpose(0, 1)  # (B, H, S, C)
    q = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).to(kv.dtype).reshape(B, H * S, -1)  # (B, H*S, C + R)
    scores = torch.matmul(q, kv.transpose(1, 2)).float().view(B, H, S, -1) * attn.softmax_scale
    masked = masked.view(B, -1, masked.shape[-1])  # (B, L) is taken as (B, 1, L)
    probs = scores.masked_fill(masked[:, None], float("-inf")).softmax(dim=-1).to(kv.dtype)
    o_lat = torch.matmul(probs.view(B, H * S, -1), kv[..., :C])  # (B, H*S, C)
    o_lat = o_lat.view(B, H, S, C).transpose(0, 1).reshape(H, B * S, C)
    out = torch.matmul(o_lat.to(w_uv.dtype), w_uv.transpose(1, 2))  # (H, B*S, v)
    return out.view(H, B, S, attn.v_dim).permute(1, 2, 0, 3).reshape(B, S, H * attn.v_dim)


def expanded_prefill(attn, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, start: int) -> torch.Tensor:
    """Queries at positions start..start+S-1 of one sequence over its cached tokens 0..T-1 (T = start + S):
    q_nope (1,H,S,nope), q_pe (1,H,S,R), kv (1,T,C+R) -> (1, S, H*v)."""
    S = q_nope.shape[2]
    latent, k_pe = kv.split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    k, v = attn.expand_kv(latent, k_pe[:, None])
    q = torch.cat([q_nope, q_pe], dim=-1).to(k.dtype)
    return window_attention(q, k, v, attn.softmax_scale, start).transpose(1, 2).reshape(1, S, -1)


def mha_decode(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """q (B,H,S,hd) (S new tokens per row), cached k and v (B,Hkv,L,hd), masked (B,S,L) -> (B, S, H*hd). Query
    head h reads kv head h // (H / Hkv), as the model's repeat_interleave does."""
    B, H, S, hd = q.shape
    kv_heads = k.shape[1]
    rep = H // kv_heads
    qg = q.reshape(B, kv_heads, rep * S, hd).to(k.dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().view(B, kv_heads, rep, S, -1) * attn.softmax_scale
    masked = masked.view(B, -1, masked.shape[-1])  # (B, L) is taken as (B, 1, L)
    probs = scores.masked_fill(masked[:, None, None], float("-inf")).softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(B, kv_heads, rep * S, -1), v)  # (B, Hkv, rep*S, hd)
    return out.view(B, H, S, hd).transpose(1, 2).reshape(B, S, H * hd)


def mha_prefill(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q (1,H,S,hd) at positions start.., cached k and v (1,Hkv,T,hd) -> (1, S, H*hd)."""
    S = q.shape[2]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return window_attention(q.to(k.dtype), k, v, attn.softmax_scale, start).transpose(1, 2).reshape(1, S, -1)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int) -> torch.Tensor:
    """Causal attention of S queries at positions start..start+S-1 over keys 0..start+S-1."""
    if start == 0:
        return causal_attention(q, k, v, scale)
    S, T = q.shape[2], k.shape[2]
    allowed = torch.arange(T, device=q.device)[None, :] <= torch.arange(start, start + S, device=q.device)[:, None]
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))  # one head width for every SDPA backend (MLA: 192-wide q/k, 128 v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)[..., :dv]
