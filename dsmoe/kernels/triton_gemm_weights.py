"""Expert weight gradients: a GEMM grouped along the reduced dimension (the rows of each expert).

dW[e] = A_e^T @ B_e, summed over the rows of expert e (rows offsets[e-1]:offsets[e] of the sorted order)

- down projection: dW_down[e] [D, F] = dy[tokens of e]^T @ (w * h)_e; A is dy gathered through the sort
  order (the gate weight is folded into h by the SwiGLU backward, so no operand is rescaled here).
- gate_up projection: dW_gu[e] [2F, D] = dgu_e^T @ x[tokens of e]; B is x gathered.

One program per (expert, output tile) walks that expert's rows in BLOCK_K steps and writes its tile
once: no atomics, deterministic, and an expert without rows gets exact zeros. Programs of one expert
are adjacent, so the expert's rows stay in L2 while its tiles are computed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsmoe.kernels.triton_configs import (WEIGHT_CONFIGS, dot_precision, prune_weight_configs, rows_hint,
                                          tolerant_bench)


@triton.autotune(configs=WEIGHT_CONFIGS, key=["I", "J", "ROWS_HINT", "GATHER_A", "GATHER_B"],
                 prune_configs_by={"early_config_prune": prune_weight_configs}, do_bench=tolerant_bench)
@triton.jit(do_not_specialize=["E", "ROWS_HINT"])
def _grouped_weight_grad_kernel(
    a_ptr, b_ptr, out_ptr, order_ptr, offsets_ptr,
    I, J, E, TOPK, stride_am, stride_bm, stride_oe, stride_oi,
    ROWS_HINT,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # BLOCK_M x BLOCK_N is the output tile over (I, J); BLOCK_K rows are reduced per step.
    pid = tl.program_id(0)
    num_i = tl.cdiv(I, BLOCK_M)
    num_j = tl.cdiv(J, BLOCK_N)
    expert = pid // (num_i * num_j)
    tile = pid % (num_i * num_j)
    per_group = GROUP_M * num_j
    first_i = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_i - first_i, GROUP_M)
    pid_i = first_i + (tile % per_group) % group_rows
    pid_j = (tile % per_group) // group_rows

    row_start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    row_end = tl.load(offsets_ptr + expert)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = offs_i < I
    j_ok = offs_j < J
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        flat = tl.load(order_ptr + rows, mask=row_ok, other=0)
        a_rows = (flat // TOPK) if GATHER_A else rows
        b_rows = (flat // TOPK) if GATHER_B else rows
        a = tl.load(a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_i[None, :],
                    mask=row_ok[:, None] & i_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows.to(tl.int64)[:, None] * stride_bm + offs_j[None, :],
                    mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe
                + offs_i.to(tl.int64)[:, None] * stride_oi + offs_j[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


def grouped_weight_grad(
    a: torch.Tensor, b: torch.Tensor, order_N: torch.Tensor, offsets_E: torch.Tensor, topk: int, *,
    gather_a: bool, gather_b: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    """[E, I, J] with out[e] = sum over the rows of e of A[row]^T B[row] (rows gathered as asked)."""
    if a.stride(-1) != 1 or b.stride(-1) != 1 or order_N.dtype != torch.int32:
        raise ValueError("grouped_weight_grad: A and B need unit stride along their columns, int32 order")
    E, I, J = offsets_E.numel(), a.shape[1], b.shape[1]
    out = torch.empty(E, I, J, dtype=out_dtype, device=a.device)
    if E == 0 or I == 0 or J == 0:
        return out
    if order_N.numel() == 0:
        return out.zero_()

    def grid(meta):  # one program per (expert, output tile), experts outermost
        return (E * triton.cdiv(I, meta["BLOCK_M"]) * triton.cdiv(J, meta["BLOCK_N"]),)

    _grouped_weight_grad_kernel[grid](
        a, b, out, order_N, offsets_E,
        I, J, E, topk, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        rows_hint(order_N.numel(), E),
        GATHER_A=gather_a, GATHER_B=gather_b, PRECISION=dot_precision(a.dtype),
    )
    return out
