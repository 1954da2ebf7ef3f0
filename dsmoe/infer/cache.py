"""Preallocated KV caches: one slot per running sequence, static shapes, so decode can run as a CUDA graph.

The cache is storage. Each attention module says what it stores per token (`cache_shapes`, `cache_seq_dim`;
MLA: the normalised latent and the roped shared key, C + R values; MHA: roped K and V per kv-head), and a
forward is handed a *view* that says where its tokens go and what they attend to:
- `cache.prefill(slots, start, length)`: one sequence or several side by side (rows of the forward, in the order
  of `slots`), `length` prompt tokens each at positions start.., attending over each slot's cached prefix. Rows
  shorter than `length` are right-padded: their padding lands past their own end, where decode never looks
  (it masks by position, and writes position p before it attends to it);
- `cache.decode(positions, length)`: rows 0..B-1 are slots 0..B-1, one token each at `positions[b]` (or S tokens
  at `positions[b, :]` when speculative decoding verifies drafts), each attending over cache positions
  [0, length) up to its own. Speculation rolls a sequence back by moving its position only: entries written
  past it are hidden from every later query (masked) until they are overwritten.
The attention module picks its path from the view (`start` or `decode_mask`); the engine never reaches into it.

Every buffer has one spare position, `trash` = max_len: rows of a decode batch that carry no live sequence
(free slots, slots being prefilled, finished sequences still in flight) write there, outside any window a
live sequence reads, so a fixed-size captured decode step never corrupts another sequence's cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, blocks, num_slots: int, max_len: int, device: torch.device | str, dtype: torch.dtype):
        """blocks: the decoder blocks whose attention this cache serves, in order (`model.layers`; speculative
        decoding keeps its MTP module's cache in a second KVCache)."""
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_len >= 1, got {num_slots} and {max_len}")
        self.num_slots, self.max_len = num_slots, max_len
        self.trash = max_len
        self.rows = torch.arange(num_slots, device=device)
        self.key_positions = torch.arange(max_len + 1, device=device)
        attentions = [block.self_attn for block in blocks]
        self.seq_dims = [attn.cache_seq_dim for attn in attentions]
        self.layers = [[torch.zeros(shape, device=device, dtype=dtype)
                        for shape in attn.cache_shapes(num_slots, max_len + 1)] for attn in attentions]

    def prefill(self, slots: int | list[int], start: int, length: int) -> "CacheView":
        slots = [slots] if isinstance(slots, int) else list(slots)
        bad = [s for s in slots if not 0 <= s < self.num_slots]
        if bad or not slots or len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} are not distinct slots in 0..{self.num_slots - 1}")
        if start + length > self.max_len:
            raise ValueError(f"prefill up to position {start + length} exceeds the cache length {self.max_len}")
        return CacheView(self, self.index(slots), start, start + length, None)

    def index(self, slots: list[int]) -> slice | torch.Tensor:
        """Distinct slots as an index into a per-slot buffer: a slice (a view, nothing copied) when they are
        consecutive, else an index tensor."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self.rows.device)

    def decode(self, positions: torch.Tensor, length: int) -> "CacheView":
        """positions (B,) or (B, S) int64 on the cache's device; row b is slot b and attends over [0, length)."""
        B = positions.shape[0]
        if B > self.num_slots or not 1 <= length <= self.max_len:
            raise ValueError(f"decode of {B} rows over {length} positions does not fit "
                             f"{self.num_slots} slots of {self.max_len}")
        positions = positions.reshape(B, -1)
        masked = self.key_positions[:length] > positions[..., None]  # (B, S, L), once per step for every layer
        return CacheView(self, (self.rows[:B, None], positions), 0, length, masked)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layer in self.layers for b in layer)

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies over all layers (what a decode step reads per context token)."""
        return sum(b[0].numel() // (self.max_len + 1) * b.element_size() for layer in self.layers for b in layer)


class CacheView:
    """One forward's place in a KVCache; `view[i]` is what layer i's attention receives."""

    def __init__(self, cache: KVCache, where, start: int, end: int, decode_mask: torch.Tensor | None):
        self.cache, self.where, self.start, self.end, self.decode_mask = cache, where, start, end, decode_mask

    def __getitem__(self, i: int) -> "LayerView":
        return LayerView(self, self.cache.layers[i], self.cache.seq_dims[i])

    def __len__(self) -> int:
        return len(self.cache.layers)


class LayerView:
    """`update(*new)` stores this forward's entries (in the attention's own layout) and returns the windows to
    attend over; `start` (prefill: first query position) or `decode_mask` ((B, S, L), True = hidden) says which."""

    def __init__(self, view: CacheView, buffers: list[torch.Tensor], seq_dim: int):
        # the layer's buffers themselves, not its index: a compiled block must not specialise on the layer
        self.view, self.buffers, self.seq_dim = view, buffers, seq_dim
        self.start, self.decode_mask = view.start, view.decode_mask

    def update(self, *new: torch.Tensor) -> list[torch.Tensor]:
        view, dim = self.view, self.seq_dim
        windows = []
        for buf, entry in zip(self.buffers, new):
            by_token, entry = buf.movedim(dim, 1), entry.to(buf.dtype).movedim(dim, 1)  # (slots, T, ...) views
            if view.decode_mask is None:  # where: the rows' slots (cache.index)
                by_token[view.where, view.start: view.end] = entry
                window = by_token[view.where, : view.end]
            else:
                rows, positions = view.where  # (B, 1), (B, S)
                by_token.index_put_((rows, positions), entry)
                window = by_token[: rows.shape[0], : view.end]
            windows.append(window.movedim(1, dim))
        return windows
