"""MLA decode attention over the compressed cache in one pass (split-KV, as FlashMLA and flash-decoding do).

The absorbed decode (dsmoe/model/attention.py) scores each query head against the cached entries [c_t ; k_pe_t]
(C + R values per token, shared by every head) and sums the latents c_t under the softmax. In plain PyTorch that
is a GEMM for the scores, a softmax over fp32 scores written to memory and read back, and a second GEMM that
reads the cache again. Here one program takes BLOCK_M query rows (heads x draft positions of one sequence) and a
range of cache positions, reads each cached entry once, and keeps an online softmax (running max and sum) with
a [BLOCK_M, C] fp32 accumulator. Sequences with few rows split their positions over several programs so the
GPU is filled at batch 1; `_mla_combine_kernel` then merges the partial results by their log-sum-exp. Columns that
no row of a tile may read (past each row's position: decode's length buckets pad up to 2x) are not loaded.

Forward only, for inference: `ops.mla_decode_attention` takes it on CUDA for a bf16/fp16 cache when no gradient
is wanted (also under torch.compile, as the custom op `dsmoe::mla_decode`); `mla_decode_attention_reference` is
the spec, and runs for an fp32 cache.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsmoe.kernels.triton_configs import dot_precision


@triton.jit
def _mla_partial_kernel(qc_ptr, qr_ptr, kv_ptr, hidden_ptr, out_ptr, lse_ptr,
                    S, M, L, scale,
                    s_qc_b, s_qc_h, s_qc_s, s_qr_b, s_qr_h, s_qr_s, s_kv_b, s_kv_l, s_hid_b, s_hid_s,
                    s_out_split, s_out_b, s_out_h, s_out_s, s_lse_split, s_lse_b,
                    C: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, TILES: tl.constexpr, FINAL: tl.constexpr,
                    PRECISION: tl.constexpr):
    b, split = tl.program_id(0).to(tl.int64), tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = head * S + draft position
    row_ok = rows < M
    h, s = rows // S, rows % S
    cc, rr = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    c_ok, r_ok = cc < C, rr < R
    dtype = kv_ptr.dtype.element_ty
    q_c = tl.load(qc_ptr + b * s_qc_b + h[:, None] * s_qc_h + s[:, None] * s_qc_s + cc[None, :],
                  mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(dtype)
    q_r = tl.load(qr_ptr + b * s_qr_b + h[:, None] * s_qr_h + s[:, None] * s_qr_s + rr[None, :],
                  mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    start = split * (TILES * BLOCK_N)
    end = tl.minimum(start + TILES * BLOCK_N, L)
    for n0 in range(0, TILES * BLOCK_N, BLOCK_N):
        n = start + n0 + tl.arange(0, BLOCK_N)
        hidden = tl.load(hidden_ptr + b * s_hid_b + s[:, None] * s_hid_s + n[None, :],
                         mask=row_ok[:, None] & (n < end)[None, :], other=1)
        visible = hidden == 0
        col_read = tl.max(visible.to(tl.int32), axis=0) > 0  # a position some row of the tile attends to
        if tl.max(col_read.to(tl.int32), axis=0) > 0:  # tiles past every row's position cost only their mask
            entry = kv_ptr + b * s_kv_b + n[:, None] * s_kv_l
            kv_c = tl.load(entry + cc[None, :], mask=col_read[:, None] & c_ok[None, :], other=0.0)
            kv_r = tl.load(entry + C + rr[None, :], mask=col_read[:, None] & r_ok[None, :], other=0.0)
            scores = (tl.dot(q_c, tl.trans(kv_c), input_precision=PRECISION)
                      + tl.dot(q_r, tl.trans(kv_r), input_precision=PRECISION))
            scores = tl.where(visible, scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet: exp(-inf) = 0
            alpha = tl.exp(m_i - m_base)
            p = tl.exp(scores - m_base[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), kv_c, input_precision=PRECISION)
            m_i = m_new
    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = out_ptr + split * s_out_split + b * s_out_b + h[:, None] * s_out_h + s[:, None] * s_out_s + cc[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])
    if not FINAL:
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + split * s_lse_split + b * s_lse_b + rows, lse, mask=row_ok)


@triton.jit
def _mla_combine_kernel(part_ptr, lse_ptr, out_ptr, S, M, splits,
                    s_part_split, s_part_b, s_part_h, s_part_s, s_lse_split, s_lse_b, s_out_b, s_out_h, s_out_s,
                    C: tl.constexpr, COMBINE_C: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    b, row = tl.program_id(0).to(tl.int64), tl.program_id(1)
    h, s = row // S, row % S
    k = tl.arange(0, BLOCK_SPLITS)
    lse = tl.load(lse_ptr + k * s_lse_split + b * s_lse_b + row, mask=k < splits, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
    weight = weight / tl.maximum(tl.sum(weight, axis=0), 1e-30)
    for c0 in range(0, C, COMBINE_C):  # a [splits, COMBINE_C] fp32 tile at a time, kept in registers
        cc = c0 + tl.arange(0, COMBINE_C)
        part = tl.load(part_ptr + k[:, None] * s_part_split + b * s_part_b + h * s_part_h + s * s_part_s
                       + cc[None, :], mask=(k < splits)[:, None] & (cc < C)[None, :], other=0.0)
        out = tl.sum(part * weight[:, None], axis=0)
        tl.store(out_ptr + b * s_out_b + h * s_out_h + s * s_out_s + cc, out.to(out_ptr.dtype.element_ty),
                 mask=cc < C)


BLOCK_M = 16  # query rows per program: [16, C] fp32 accumulator + a [32, C] cache tile fit 8 warps' registers
BLOCK_N = 32
MAX_SPLITS = 128  # about one program per SM at batch 1 (the merge holds a row's split weights at once)


@functools.cache
def _programs_to_fill(device_index: int) -> int:
    """One program per SM: its 256 threads hold nearly all of an SM's registers (241 each at C = 512, sm_90)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(batch: int, row_blocks: int, length: int, device: torch.device) -> int:
    """How many programs share one sequence's positions: enough to fill the GPU, at most one per tile. Depends
    only on shapes, so a captured decode step keeps its launch."""
    fill = _programs_to_fill(device.index or 0) if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(length, BLOCK_N), triton.cdiv(fill, batch * row_blocks), MAX_SPLITS))


def mla_decode_triton(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, hidden: torch.Tensor,
                      scale: float, splits: int | None = None) -> torch.Tensor:
    """The contract of `mla_decode_attention_reference`: q_lat (B, H, S, C), q_pe (B, H, S, R) (any strides,
    unit stride last), kv (B, L, C + R) (unit stride last), hidden (B, S, L) or (B, L) bool, True = not attended
    -> (H, B, S, C) in kv's dtype, head-major (the layout of the absorbed output GEMM). A row that may read no
    position gives 0 (the reference: NaN; decode always shows position 0). splits: positions split over this
    many programs per row block (default: `split_count`)."""
    B, H, S, C = q_lat.shape
    R, L = q_pe.shape[-1], kv.shape[1]
    mask_rows = hidden.shape[1] if hidden.dim() == 3 else 1
    if (kv.shape != (B, L, C + R) or q_pe.shape[:3] != (B, H, S) or hidden.shape[0] != B or hidden.shape[-1] != L
            or mask_rows not in (1, S) or hidden.dtype != torch.bool):
        raise ValueError(f"mla decode: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, cache "
                         f"{tuple(kv.shape)} and mask {tuple(hidden.shape)} {hidden.dtype} do not fit "
                         "(the mask is bool)")
    out = torch.empty(H, B, S, C, dtype=kv.dtype, device=kv.device)
    if out.numel() == 0 or L == 0:  # no position to read: every row gives 0
        return out.zero_()
    q_lat, q_pe, kv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_lat, q_pe, kv))
    hidden = hidden.reshape(B, mask_rows, L).contiguous().view(torch.uint8)
    s_hid_s = hidden.stride(1) if mask_rows > 1 else 0  # one mask row for every draft position
    M = H * S
    row_blocks = triton.cdiv(M, BLOCK_M)
    splits = min(splits or split_count(B, row_blocks, L, kv.device), MAX_SPLITS)
    # tiles per program a power of two: a constant of the kernel, so few compilations cover every length bucket
    tiles = triton.next_power_of_2(triton.cdiv(triton.cdiv(L, splits), BLOCK_N))
    splits = triton.cdiv(L, tiles * BLOCK_N)
    final = splits == 1
    part = out.permute(1, 0, 2, 3)[None] if final else torch.empty(splits, B, H, S, C, dtype=torch.float32,
                                                                   device=kv.device)
    lse = torch.empty(splits, B, M, dtype=torch.float32, device=kv.device)
    block_c, block_r = max(16, triton.next_power_of_2(C)), max(16, triton.next_power_of_2(R))
    _mla_partial_kernel[(B, row_blocks, splits)](
        q_lat, q_pe, kv, hidden, part, lse, S, M, L, scale,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        kv.stride(0), kv.stride(1), hidden.stride(0), s_hid_s,
        part.stride(0), part.stride(1), part.stride(2), part.stride(3), lse.stride(0), lse.stride(1),
        C=C, R=R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=block_c, BLOCK_R=block_r, TILES=tiles, FINAL=final,
        PRECISION=dot_precision(kv.dtype), num_warps=8, num_stages=2)
    if not final:
        block_splits = triton.next_power_of_2(splits)  # a [splits, COMBINE_C] fp32 tile of at most 4096 values
        _mla_combine_kernel[(B, M)](
            part, lse, out, S, M, splits, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            lse.stride(0), lse.stride(1), out.stride(1), out.stride(0), out.stride(2),
            C=C, COMBINE_C=max(16, min(block_c, 4096 // block_splits)), BLOCK_SPLITS=block_splits, num_warps=4)
    return out
