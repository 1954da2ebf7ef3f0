"""Row-grouped GEMM: rows sorted by expert, each row block times its expert's weight, epilogues fused.

out[r] = A[src(r)] @ B_e   for the rows r of expert e (rows offsets[e-1]:offsets[e] of the sorted order)

One kernel, two epilogues (MODE):
- SWIGLU (forward, gate_up): A is x gathered through the sort order (no permuted copy of x is ever
  written); two accumulators, gate and up columns; stores the pre-activations gu (kept for backward)
  and h = silu(g) * u, computed from the rounded g, u so backward recomputes the same h bit for bit.
- PLAIN (forward down projection, backward dX and, off Hopper, backward dh): out = acc; A gathered
  through the sort order or read in row order.

Weights whose rows are the output columns (every forward GEMM) are read with tensor descriptors, i.e. the
bulk tensor copy engine (measured on an H200: 1.05-1.15x the pointer loads); the backward GEMMs read
[K, N]-major weight tiles, where pointer loads measured faster, and gathered rows cannot use it at all.

Tiles: each expert's rows are cut into cdiv(rows_e, BLOCK_M) tiles; a program finds its expert with a
cumsum over the E tile counts (read from offsets, on the device), so the row layout does not depend on
BLOCK_M and autotuning may pick any. The grid is an upper bound (cdiv(N, BLOCK_M) + E tiles); programs
past the last tile return at once. Expert offsets are int64 so E*2F*D > 2^31 weights index correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsmoe.kernels.triton_configs import ROW_CONFIGS, dot_precision, prune_row_configs, rows_hint, tolerant_bench

PLAIN, SWIGLU = 0, 1


@triton.jit
def expert_tile(offsets_ptr, tile, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of the `tile`-th row tile; expert >= E when past the last tile."""
    e_ids = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + e_ids, mask=e_ids < E, other=0)
    starts = tl.load(offsets_ptr + e_ids - 1, mask=(e_ids > 0) & (e_ids < E), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_end <= tile).to(tl.int32), axis=0)
    mine = e_ids == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
    return expert, row_start, row_end


@triton.autotune(configs=ROW_CONFIGS, key=["N_OUT", "K_IN", "ROWS_HINT", "MODE", "GATHER_A", "B_DESC"],
                 prune_configs_by={"early_config_prune": prune_row_configs}, do_bench=tolerant_bench)
@triton.heuristics({"EVEN_K": lambda a: a["K_IN"] % a["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["N_ROWS", "E", "ROWS_HINT"])
def _grouped_rows_kernel(
    a_ptr, b_ptr, out_ptr, gu_ptr, order_ptr, offsets_ptr,
    N_ROWS, N_OUT, K_IN, E, TOPK,
    stride_am, stride_be, stride_bk, stride_bn, stride_om, stride_gm,
    ROWS_HINT,
    MODE: tl.constexpr, GATHER_A: tl.constexpr, STORE_GU: tl.constexpr, B_DESC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles share each weight column tile while it is hot in L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    max_m = tl.minimum(tl.cdiv(N_ROWS, BLOCK_M) + E, N_ROWS)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(max_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    expert, row_start, row_end = expert_tile(offsets_ptr, pid_m, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    src = (tl.load(order_ptr + rows, mask=row_ok, other=0) // TOPK) if GATHER_A else rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + src.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = (b_ptr + expert.to(tl.int64) * stride_be
              + offs_k[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn)
    up_shift = N_OUT * stride_bn  # SWIGLU: the up rows follow the F gate rows
    if B_DESC:  # the weights as one [E * rows, K] matrix; the tail past K_IN reads as zeros
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * (stride_be // stride_bn), K_IN],
                                           strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        b_row = expert * (stride_be // stride_bn) + pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K_IN, BLOCK_K):
        if EVEN_K:
            a_mask = row_ok[:, None]
            b_mask = col_ok[None, :]
        else:
            k_ok = offs_k < K_IN - k0
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if B_DESC:
            b = b_desc.load([b_row, k0]).T
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if MODE == 1:
            if B_DESC:
                b_up = b_desc.load([b_row + N_OUT, k0]).T
            else:
                b_up = tl.load(b_ptrs + up_shift, mask=b_mask, other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk

    rows64 = rows.to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :]
    dtype = out_ptr.dtype.element_ty
    if MODE == 0:
        tl.store(out_ptrs, acc.to(dtype), mask=ok)
    else:
        gate = acc.to(dtype)
        up = acc_up.to(dtype)
        if STORE_GU:
            gu_ptrs = gu_ptr + rows64[:, None] * stride_gm + cols[None, :]
            tl.store(gu_ptrs, gate, mask=ok)
            tl.store(gu_ptrs + N_OUT, up, mask=ok)
        g = gate.to(tl.float32)
        tl.store(out_ptrs, (g * tl.sigmoid(g) * up.to(tl.float32)).to(dtype), mask=ok)


def grouped_rows(
    mode: int, a: torch.Tensor, b_E: torch.Tensor, b_strides: tuple[int, int], n_out: int,
    order_N: torch.Tensor, offsets_E: torch.Tensor, topk: int, *, gather_a: bool,
    gu: torch.Tensor | None = None, store_gu: bool = False,
) -> torch.Tensor:
    """Launch one row-grouped GEMM: out [N, n_out]. b_E [E, ...] with (stride over the reduced dim, stride
    over output columns) in b_strides. SWIGLU returns h and, with store_gu, fills `gu` [N, 2*n_out]."""
    N, K_in, E = order_N.numel(), a.shape[1], b_E.shape[0]
    if a.stride(-1) != 1 or b_E.stride(0) < 0 or offsets_E.shape != (E,) or order_N.dtype != torch.int32:
        raise ValueError("grouped_rows: A needs unit stride along K, offsets [E] and int32 row order")
    out = torch.empty(N, n_out, dtype=a.dtype, device=a.device)
    if N == 0 or n_out == 0:
        return out
    gu_arg = gu if gu is not None else out

    def grid(meta):  # an upper bound on the row tiles (each holds >= 1 row) times the column tiles
        return (min(triton.cdiv(N, meta["BLOCK_M"]) + E, N) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    _grouped_rows_kernel[grid](
        a, b_E, out, gu_arg, order_N, offsets_E, N, n_out, K_in, E, topk,
        a.stride(0), b_E.stride(0), b_strides[0], b_strides[1], out.stride(0), gu_arg.stride(0),
        rows_hint(N, E),
        MODE=mode, GATHER_A=gather_a, STORE_GU=store_gu, B_DESC=weights_by_descriptor(b_E, b_strides),
        PRECISION=dot_precision(a.dtype), BLOCK_E=triton.next_power_of_2(E),
    )
    return out


def weights_by_descriptor(b_E: torch.Tensor, b_strides: tuple[int, int]) -> bool:
    """Whether the weight tiles go through a tensor descriptor: only when the reduced dimension is the
    contiguous one (each weight row is an output column) and the copy engine's 16-byte alignment holds."""
    stride_k, stride_n = b_strides
    usable = (stride_k == 1 and stride_n * b_E.element_size() % 16 == 0 and b_E.data_ptr() % 16 == 0
              and b_E.stride(0) % stride_n == 0)
    if usable:
        triton.set_allocator(_descriptor_scratch)
    return usable


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory where programs build their tensor descriptors (Triton asks for it per launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")
