"""Attention over packed rows: several examples per row, each attending causally within itself only.

Three paths compute the same thing:
- the reference (any device, any dtype): SDPA with a (B, 1, S, S) block-diagonal causal mask
  (`document_mask`). On a GPU an arbitrary mask keeps SDPA off its flash kernels and computes every
  query-key pair of the row, so it costs a multiple of pretraining's causal attention;
- variable-length flash attention (CUDA, bf16/fp16, `torch.nn.attention.varlen`): the B*S positions are
  one flat sequence of examples delimited by `cu_seqlens`, and the kernel computes each example's causal
  triangle only;
- flex attention with a document block mask (CUDA, DSMOE_PACKED_ATTENTION=flex; compiled): blocks that no query
  may read are skipped and v keeps its own width.

`PackedLayout` carries what each needs. It is built on the host when a packed batch is built
(`PackedLayout.from_segment_ids`), so the step never waits on the device to learn the example lengths.
DSMOE_PACKED_ATTENTION (varlen, the default; flex; sdpa, the reference on every device) picks the path
(benchmarks and tests compare them).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import torch
import torch.nn.functional as F

from dsmoe.errors import UserError

FLASH_DTYPES = (torch.bfloat16, torch.float16)
PATHS = ("varlen", "flex", "sdpa")


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, S) -> (B, 1, S, S) bool: query i may read key j when j <= i and both belong to the same
    segment (packed sequences: one example per segment, so none attends across examples)."""
    S = segment_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril()
    return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]


@dataclass  # not frozen: FSDP's input casting of older torch sets the fields of a dataclass copy
class PackedLayout:
    """Where the examples of a packed batch lie. segment_ids (B, S): one id per example, each example one run of
    consecutive positions in its row (-1 on the padded tail). cu_seqlens (N + 1,) int32: the runs' boundaries
    over the flattened B*S positions, a row's padded tail being a run of its own (it then attends to itself,
    as the mask path's equal ids -1 do: every output position is defined and the same on both paths).
    max_len: the longest run (a host int: the varlen kernel sizes its grid by it).

    The path, chosen once per forward by `for_forward`: kernel, the varlen kernel (`adapt`); block_mask, flex
    attention's document block mask; or mask, the reference path's document mask; each built there once for all
    layers."""

    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    kernel: Callable | None = None
    mask: torch.Tensor | None = None
    block_mask: object | None = None  # torch.nn.attention.flex_attention.BlockMask, imported on first use

    @classmethod
    def from_segment_ids(cls, segment_ids: torch.Tensor) -> PackedLayout:
        """Built on the host when the batch is built (from a CPU tensor: no device sync)."""
        B, S = segment_ids.shape
        starts = torch.ones(B, S, dtype=torch.bool, device=segment_ids.device)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        bounds = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * S], device=segment_ids.device)])
        return cls(segment_ids, bounds.to(torch.int32), int(bounds.diff().max()))

    def to(self, device: torch.device, non_blocking: bool = False) -> PackedLayout:
        return PackedLayout(self.segment_ids.to(device, non_blocking=non_blocking),
                            self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_len)

    def for_forward(self) -> PackedLayout:
        """On CUDA the path DSMOE_PACKED_ATTENTION names (varlen where this torch has the kernel, flex's block
        mask, or sdpa's mask); elsewhere the mask. Called once per forward by Transformer.forward, outside the
        blocks that the default per-block compile compiles, so they read a ready choice (whole-model compile
        traces this too)."""
        if self.kernel is not None or self.mask is not None or self.block_mask is not None:
            return self
        path = os.environ.get("DSMOE_PACKED_ATTENTION", "varlen")
        if path not in PATHS:
            raise UserError(f"DSMOE_PACKED_ATTENTION={path!r}: choose one of {', '.join(PATHS)}")
        device = self.segment_ids.device
        if device.type == "cuda" and path == "flex":
            return replace(self, block_mask=document_block_mask(self.segment_ids))
        if device.type == "cuda" and path == "varlen":
            kernel = installed_varlen()
            if kernel is not None:
                return replace(self, kernel=kernel)
        return replace(self, mask=document_mask(self.segment_ids))


def adapt(varlen_attn: Callable) -> Callable:
    """torch's varlen_attn -> f(q, k, v, cu_seqlens, max_len, scale), (T, H, D) each, one causal sequence per run
    of cu_seqlens. Its keywords moved between releases (2.9: is_causal, no scale; later: scale, and
    window_size=(-1, 0) for causal); read once here, not while torch.compile traces."""
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    takes_scale = "scale" in params

    def causal_varlen(q, k, v, cu_seqlens, max_len: int, scale: float):
        if takes_scale:
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **causal)
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(D)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **causal)

    return causal_varlen


@cache
def installed_varlen() -> Callable | None:
    """The adapted kernel, or None where this torch lacks it. Imported on first use: the module loads
    torch._dynamo (over a second), which a CPU run need not pay."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return adapt(varlen_attn)


def document_block_mask(segment_ids: torch.Tensor):
    """flex attention's block mask of `document_mask`: query i reads key j when j <= i in the same example."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = segment_ids.shape

    def same_example_causal(b, h, i, j):
        return (segment_ids[b, i] == segment_ids[b, j]) & (j <= i)

    return create_block_mask(same_example_causal, B, None, S, S, device=segment_ids.device)


@cache
def flex_attention_for(device_type: str) -> Callable:
    """Compiled on CUDA (one fused kernel that skips the masked blocks; inside compiled blocks it is traced
    through); eager elsewhere, forward only (torch has no CPU backward for it): the CPU tests compare it there."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def padded_value(v: torch.Tensor, width: int) -> torch.Tensor:
    """v with its head width zero-padded to `width` (MLA's 128 to the queries' 192): the flash kernels and every
    SDPA backend with a mask take one head width; slice the output back to v's width."""
    return v if v.shape[-1] == width else F.pad(v, (0, width - v.shape[-1]))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     layout: PackedLayout) -> torch.Tensor:
    """(B, H, S, Dqk), (B, H, S, Dqk), (B, H, S, Dv) -> (B, H, S, Dv), each example of the rows attending
    causally within itself. Flex takes v as it is; for the others v is padded to the query width: the flash
    kernels take one head width (MLA's 192 and 128), and so does every SDPA backend with a mask."""
    if layout.block_mask is not None:
        return flex_attention_for(q.device.type)(q, k, v, block_mask=layout.block_mask, scale=scale)
    dv = v.shape[-1]
    v = padded_value(v, q.shape[-1])
    if layout.kernel is not None and q.dtype in FLASH_DTYPES:
        B, H, S, _ = q.shape
        flat = [t.transpose(1, 2).reshape(B * S, H, -1) for t in (q, k, v)]
        out = layout.kernel(*flat, layout.cu_seqlens, layout.max_len, scale)
        return out.view(B, S, H, -1).transpose(1, 2)[..., :dv]
    mask = document_mask(layout.segment_ids) if layout.mask is None else layout.mask  # e.g. fp32 on CUDA
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :dv]
