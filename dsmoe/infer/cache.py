"""Preallocated KV caches: one slot per running sequence, static shapes, so decode can run as a CUDA graph.

MLA layers cache what `MLAttention.project` returns per token: the normalised latent (kv_lora_rank values)
and the roped shared key (qk_rope_head_dim values), side by side in one buffer row of C + R values
(576 at V2/V3 shapes). MHA layers cache roped K and V per kv-head.

The model only sees the attend seam (`attend_mla` / `attend_mha`, dsmoe/model/attention.py); *where* the new
tokens go is told by the engine before each forward: `cache.prefill(slot, start)` (one sequence, a chunk of
prompt tokens at positions start..start+S-1, expanded attention over the slot's cached prefix) or
`cache.decode(positions, length)` (rows 0..B-1 are slots 0..B-1, one token each at `positions[b]`, or S tokens
each at `positions[b, :]` when speculative decoding verifies drafts; weight-absorbed attention over cache
positions [0, length)). Speculation rolls a sequence back by moving its position only: entries written past
it are hidden from every later query (masked) until they are overwritten.

Every buffer has one spare position, `trash` = max_len: rows of a decode batch that carry no live sequence
(free slots, slots being prefilled, finished sequences still in flight) write there, outside any window a
live sequence reads, so a fixed-size captured decode step never corrupts another sequence's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsmoe.config import ModelConfig
from dsmoe.infer.attend import absorbed_decode, expanded_prefill, mha_decode, mha_prefill


@dataclass
class PrefillStep:
    slot: int
    start: int


@dataclass
class DecodeStep:
    positions: torch.Tensor  # (B, S) int64 on the cache's device; row b is slot b
    length: int  # attend over cache positions [0, length)
    masked: torch.Tensor  # (B, S, length) bool: cache positions past each token's own, hidden from it


class KVCache:
    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, num_layers: int | None = None):
        """num_layers: default the model's; speculative decoding keeps its MTP module's cache in a second
        KVCache of one layer."""
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_len >= 1, got {num_slots} and {max_len}")
        self.config, self.num_slots, self.max_len = config, num_slots, max_len
        self.trash = max_len
        self.rows = torch.arange(num_slots, device=device)
        self.key_positions = torch.arange(max_len + 1, device=device)
        self.step: PrefillStep | DecodeStep | None = None
        layer_cls = MLALayerCache if config.use_mla else MHALayerCache
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        self.layers = [layer_cls(self, config, device, dtype) for _ in range(num_layers)]

    def __getitem__(self, i: int) -> "MLALayerCache | MHALayerCache":
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def prefill(self, slot: int, start: int) -> "KVCache":
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside 0..{self.num_slots - 1}")
        self.step = PrefillStep(slot, start)
        return self

    def decode(self, positions: torch.Tensor, length: int) -> "KVCache":
        """positions (B,) (one token per row) or (B, S)."""
        if positions.shape[0] > self.num_slots or not 1 <= length <= self.max_len:
            raise ValueError(f"decode of {positions.shape[0]} rows over {length} positions does not fit "
                             f"{self.num_slots} slots of {self.max_len}")
        positions = positions.reshape(positions.shape[0], -1)
        masked = self.key_positions[:length] > positions[..., None]  # once per step, for every layer
        self.step = DecodeStep(positions, length, masked)
        return self

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layer in self.layers for b in layer.buffers())

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies over all layers (what a decode step reads per context token)."""
        return sum(b[0].numel() // (self.max_len + 1) * b.element_size() for layer in self.layers
                   for b in layer.buffers())

    def _prefill_range(self, seq_len: int) -> tuple[int, int, int]:
        step = self.step
        if not isinstance(step, PrefillStep):
            raise RuntimeError("the cache was not told where these tokens go: call cache.prefill() or .decode()")
        end = step.start + seq_len
        if end > self.max_len:
            raise ValueError(f"prefill up to position {end} exceeds the cache length {self.max_len}")
        return step.slot, step.start, end


class MLALayerCache:
    """kv[slot, t] = [normalised latent (C) | roped k_pe (R)] for token t of the sequence in `slot`."""

    def __init__(self, owner: KVCache, config: ModelConfig, device, dtype):
        self.owner = owner
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = torch.zeros(owner.num_slots, owner.max_len + 1, width, device=device, dtype=dtype)

    def buffers(self) -> list[torch.Tensor]:
        return [self.kv]

    def attend_mla(self, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                   k_pe: torch.Tensor) -> torch.Tensor:
        new = torch.cat([latent, k_pe.squeeze(1)], dim=-1).to(self.kv.dtype)  # (B, S, C + R)
        step = self.owner.step
        if isinstance(step, DecodeStep):
            B = q_nope.shape[0]
            self.kv.index_put_((self.owner.rows[:B, None], step.positions), new)
            return absorbed_decode(attn, q_nope, q_pe, self.kv[:B, : step.length], step.masked)
        slot, start, end = self.owner._prefill_range(new.shape[1])
        self.kv[slot, start:end] = new[0]
        return expanded_prefill(attn, q_nope, q_pe, self.kv[slot: slot + 1, :end], start)


class MHALayerCache:
    """k[slot, :, t], v[slot, :, t]: roped keys and values of token t per kv-head (head-major, so a decode
    batch's (B, Hkv) dims fold into one strided batch for the matmuls, without a copy)."""

    def __init__(self, owner: KVCache, config: ModelConfig, device, dtype):
        self.owner = owner
        shape = (owner.num_slots, config.kv_heads, owner.max_len + 1, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def attend_mha(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # (B, Hkv, S, hd)
        step = self.owner.step
        if isinstance(step, DecodeStep):
            B = q.shape[0]
            rows = self.owner.rows[:B, None]
            self.k[rows, :, step.positions] = k.transpose(1, 2)  # (B, S, Hkv, hd) at [b, :, positions[b, s]]
            self.v[rows, :, step.positions] = v.transpose(1, 2)
            return mha_decode(attn, q, self.k[:B, :, : step.length], self.v[:B, :, : step.length], step.masked)
        slot, start, end = self.owner._prefill_range(k.shape[2])
        self.k[slot, :, start:end] = k[0]
        self.v[slot, :, start:end] = v[0]
        return mha_prefill(attn, q, self.k[slot: slot + 1, :, :end], self.v[slot: slot + 1, :, :end], start)
