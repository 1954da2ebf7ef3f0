"""Token permutation on the device: a stable counting sort of the T*K routing decisions by expert, and
its inverse, the per-token combine of the K expert outputs.

The sort is two small kernels around one torch cumsum, never a host sync:
1. `_histogram_kernel`: program p counts the experts of its slice of DECISIONS_PER_PROG decisions.
2. base[p, e] = (rows of experts < e) + (rows of expert e in slices < p): an exclusive cumsum of the
   [E, P] histogram read expert-major.
3. `_scatter_kernel`: program p walks its slice in order, so a decision's row is base[p, e] plus the
   number of earlier decisions of its slice with the same expert: the order is exactly that of
   `torch.argsort(stable=True)` (the reference), hence deterministic.
Up to DECISIONS_PER_PROG decisions (every decode step, short prefills) one program holds the whole
histogram, so `_sort_one_program_kernel` does the three steps in one launch instead of five (histogram,
cumsum, subtraction, scatter, the offsets' copy): launches, not bytes, bound a decode step.

Outputs (int32): order_N[row] = flat decision index t*K + k of each expert-sorted row, inverse_N its
inverse, offsets_E the inclusive row ends per expert (the layout `grouped_mm` and our GEMMs take).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DECISIONS_PER_PROG = 1024  # T*K = 131072 decisions give 128 programs


@triton.jit
def _one_hot(idx_ptr, start, N, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    pos = start + tl.arange(0, CHUNK)
    expert = tl.load(idx_ptr + pos, mask=pos < N, other=-1).to(tl.int32)
    return pos, (expert[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)


@triton.jit
def _count_slice(idx_ptr, p, N, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_PER_PROG: tl.constexpr):
    counts = tl.zeros((BLOCK_E,), tl.int32)
    for c in range(CHUNKS_PER_PROG):
        _, hot = _one_hot(idx_ptr, (p * CHUNKS_PER_PROG + c) * CHUNK, N, BLOCK_E, CHUNK)
        counts += tl.sum(hot, axis=0)
    return counts


@triton.jit
def _scatter_slice(idx_ptr, next_row, order_ptr, inverse_ptr, p, N, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                   CHUNKS_PER_PROG: tl.constexpr):
    for c in range(CHUNKS_PER_PROG):
        pos, hot = _one_hot(idx_ptr, (p * CHUNKS_PER_PROG + c) * CHUNK, N, BLOCK_E, CHUNK)
        earlier_same = tl.cumsum(hot, axis=0) - hot
        row = tl.sum(hot * (earlier_same + next_row[None, :]), axis=1)
        ok = pos < N
        tl.store(order_ptr + row, pos, mask=ok)
        tl.store(inverse_ptr + pos, row, mask=ok)
        next_row += tl.sum(hot, axis=0)


@triton.jit
def _histogram_kernel(idx_ptr, hist_ptr, N, E: tl.constexpr, BLOCK_E: tl.constexpr,
                      CHUNK: tl.constexpr, CHUNKS_PER_PROG: tl.constexpr):
    p = tl.program_id(0)
    counts = _count_slice(idx_ptr, p, N, BLOCK_E, CHUNK, CHUNKS_PER_PROG)
    col = tl.arange(0, BLOCK_E)
    tl.store(hist_ptr + col * tl.num_programs(0) + p, counts, mask=col < E)  # [E, P]: expert-major


@triton.jit
def _scatter_kernel(idx_ptr, base_ptr, order_ptr, inverse_ptr, N, E: tl.constexpr, BLOCK_E: tl.constexpr,
                    CHUNK: tl.constexpr, CHUNKS_PER_PROG: tl.constexpr):
    p = tl.program_id(0)
    col = tl.arange(0, BLOCK_E)
    next_row = tl.load(base_ptr + col * tl.num_programs(0) + p, mask=col < E, other=0)
    _scatter_slice(idx_ptr, next_row, order_ptr, inverse_ptr, p, N, BLOCK_E, CHUNK, CHUNKS_PER_PROG)


@triton.jit
def _sort_one_program_kernel(idx_ptr, order_ptr, inverse_ptr, offsets_ptr, N, E: tl.constexpr,
                             BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_PER_PROG: tl.constexpr):
    counts = _count_slice(idx_ptr, 0, N, BLOCK_E, CHUNK, CHUNKS_PER_PROG)
    ends = tl.cumsum(counts, axis=0)
    col = tl.arange(0, BLOCK_E)
    tl.store(offsets_ptr + col, ends, mask=col < E)
    _scatter_slice(idx_ptr, ends - counts, order_ptr, inverse_ptr, 0, N, BLOCK_E, CHUNK, CHUNKS_PER_PROG)


def permute_triton(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order_N, inverse_N, offsets_E), int32, for expert ids in [0, num_experts)."""
    flat = topk_idx_TK.reshape(-1)
    flat = flat if flat.is_contiguous() else flat.contiguous()
    N, E, dev = flat.numel(), num_experts, flat.device
    order = torch.empty(N, dtype=torch.int32, device=dev)
    inverse = torch.empty(N, dtype=torch.int32, device=dev)
    if N == 0:
        return order, inverse, torch.zeros(E, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(E)
    chunk = max(16, min(64, 8192 // block_e))  # the [chunk, E] one-hot stays in registers
    # a program walks its chunks one after another: a decode step's few decisions need one chunk, not the
    # 16 masked ones of a full slice (profiled on an H200: 28 us per scatter at 6 decisions)
    chunks = min(DECISIONS_PER_PROG // chunk, triton.next_power_of_2(triton.cdiv(N, chunk)))
    progs = triton.cdiv(N, chunks * chunk)
    meta = dict(E=E, BLOCK_E=block_e, CHUNK=chunk, CHUNKS_PER_PROG=chunks)
    if progs == 1:
        offsets = torch.empty(E, dtype=torch.int32, device=dev)
        _sort_one_program_kernel[(1,)](flat, order, inverse, offsets, N, **meta)
        return order, inverse, offsets
    hist = torch.empty(E, progs, dtype=torch.int32, device=dev)
    _histogram_kernel[(progs,)](flat, hist, N, **meta)
    ends = hist.view(-1).cumsum(0, dtype=torch.int32)
    base = ends - hist.view(-1)
    _scatter_kernel[(progs,)](flat, base, order, inverse, N, **meta)
    return order, inverse, ends.view(E, progs)[:, -1].contiguous()


@triton.jit
def _combine_kernel(y_ptr, inverse_ptr, weight_ptr, out_ptr, T, D, stride_y, stride_out,
                    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dim = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tok < T
    ok = tok_ok[:, None] & (dim < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in tl.static_range(K):
        row = tl.load(inverse_ptr + tok * K + k, mask=tok_ok, other=0).to(tl.int64)
        part = tl.load(y_ptr + row[:, None] * stride_y + dim[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            part = part * tl.load(weight_ptr + tok * K + k, mask=tok_ok, other=0.0).to(tl.float32)[:, None]
        acc += part
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_out + dim[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=ok)


def combine_triton(y_ND: torch.Tensor, inverse_N: torch.Tensor, weight_TK: torch.Tensor | None, T: int, K: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """out_t = sum_k weight_tk * y[inverse[t*K+k]] in fp32 (weight 1 when None), cast to out_dtype."""
    if y_ND.dim() != 2 or y_ND.shape[0] != T * K or y_ND.stride(-1) != 1 or inverse_N.shape != (T * K,):
        raise ValueError(f"combine wants y [T*K={T * K}, D] with unit last stride, got {tuple(y_ND.shape)}")
    D = y_ND.shape[1]
    out = torch.empty(T, D, dtype=out_dtype, device=y_ND.device)
    if T == 0 or D == 0:
        return out
    block_d = min(512, triton.next_power_of_2(D))
    block_t = max(1, 2048 // block_d)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _combine_kernel[grid](y_ND, inverse_N, weight_TK if weight_TK is not None else y_ND, out, T, D,
                          y_ND.stride(0), out.stride(0), K=K, HAS_WEIGHT=weight_TK is not None,
                          BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out
