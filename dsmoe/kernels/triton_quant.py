"""Triton kernels for weight-only fp8 / int8 at decode shapes: read the codes, dequantise in registers.

At one to a few dozen tokens a step is bound by the bytes of weights it reads, so the win of low precision
is reading 1 byte per weight instead of 2, which only a kernel that dequantises while loading achieves
(dequantising into a bf16 copy first would move 5 bytes per weight). Formats and the reference maths are in
`dsmoe.kernels.quant` (`dequantize`); fp8 scales are per 128x128 block, int8 scales per output row.

- `wq_matmul`: y[M, N] = x[M, K] @ W[N, K]^T for small M (tensor-core dot on bf16(codes), fp32 accumulate,
  the scale applied to each K-block's partial product).
- `wq_moe_experts`: the routed experts of a MoE layer for T*K routing decisions, one program per (decision,
  tile): it reads only the weights of the expert that decision chose, never a permutation or a padded group.
  Stage 1 writes h = silu(x W_gate^T) * (x W_up^T) in fp32, stage 2 y_n = h W_down^T; the K outputs of a
  token are combined in fp32 by the caller.
fp8 codes are passed as uint8 and bitcast in the kernel. The model dims are compile-time constants (a handful
of shapes per model), which also lets the K loops unroll.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCALE_BLOCK = 128


@triton.jit
def _load_codes(ptrs, mask, FP8: tl.constexpr):
    q = tl.load(ptrs, mask=mask, other=0)
    if FP8:
        q = q.to(tl.float8e4nv, bitcast=True)
    return q.to(tl.float32)


@triton.jit
def _wq_matmul_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, s_stride, K: tl.constexpr,
                      FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _load_codes(q_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], n_ok[:, None] & k_ok[None, :],
                        FP8).to(x.dtype)
        part = tl.dot(x, tl.trans(w))
        if FP8:  # BLOCK_K divides 128: one scale per row of this K-block
            s = tl.load(s_ptr + (offs_n // 128) * s_stride + k0 // 128, mask=n_ok, other=0.0)
            acc += part * s[None, :]
        else:
            acc += part
    if not FP8:
        acc *= tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _row_scale(s_ptr, e, rows, rows_ok, k0, s_stride_e, s_stride_r, FP8: tl.constexpr):
    """The scale of each row's current K-block (fp8) or of each row (int8), for expert e."""
    if FP8:
        return tl.load(s_ptr + e * s_stride_e + (rows // 128) * s_stride_r + k0 // 128, mask=rows_ok, other=0.0)
    return tl.load(s_ptr + e * s_stride_e + rows, mask=rows_ok, other=0.0)


@triton.jit
def _wq_moe_up_kernel(x_ptr, idx_ptr, q_ptr, s_ptr, h_ptr, s_stride_e, s_stride_r, TOP_K: tl.constexpr,
                      F: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr, BLOCK_F: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    n = tl.program_id(1)
    token = n // TOP_K
    e = tl.load(idx_ptr + n).to(tl.int64)
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    q_e = q_ptr + e * (2 * F) * D
    acc_g = tl.zeros((BLOCK_F,), tl.float32)
    acc_u = tl.zeros((BLOCK_F,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(x_ptr + token * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        ok = f_ok[:, None] & d_ok[None, :]
        g = tl.sum(_load_codes(q_e + offs_f[:, None] * D + offs_d[None, :], ok, FP8) * x[None, :], axis=1)
        u = tl.sum(_load_codes(q_e + (F + offs_f)[:, None] * D + offs_d[None, :], ok, FP8) * x[None, :], axis=1)
        if FP8:
            g *= _row_scale(s_ptr, e, offs_f, f_ok, d0, s_stride_e, s_stride_r, FP8)
            u *= _row_scale(s_ptr, e, F + offs_f, f_ok, d0, s_stride_e, s_stride_r, FP8)
        acc_g += g
        acc_u += u
    if not FP8:
        acc_g *= _row_scale(s_ptr, e, offs_f, f_ok, 0, s_stride_e, s_stride_r, FP8)
        acc_u *= _row_scale(s_ptr, e, F + offs_f, f_ok, 0, s_stride_e, s_stride_r, FP8)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + n * F + offs_f, h, mask=f_ok)


@triton.jit
def _wq_moe_down_kernel(h_ptr, idx_ptr, q_ptr, s_ptr, y_ptr, s_stride_e, s_stride_r, F: tl.constexpr,
                        D: tl.constexpr, FP8: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    n = tl.program_id(1)
    e = tl.load(idx_ptr + n).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_e = q_ptr + e * D * F
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        h = tl.load(h_ptr + n * F + offs_f, mask=f_ok, other=0.0)
        part = tl.sum(_load_codes(q_e + offs_d[:, None] * F + offs_f[None, :], d_ok[:, None] & f_ok[None, :], FP8)
                      * h[None, :], axis=1)
        if FP8:
            part *= _row_scale(s_ptr, e, offs_d, d_ok, f0, s_stride_e, s_stride_r, FP8)
        acc += part
    if not FP8:
        acc *= _row_scale(s_ptr, e, offs_d, d_ok, 0, s_stride_e, s_stride_r, FP8)
    tl.store(y_ptr + n * D + offs_d, acc, mask=d_ok)


def _codes(q: torch.Tensor) -> tuple[torch.Tensor, bool]:
    fp8 = q.dtype == torch.float8_e4m3fn
    return (q.view(torch.uint8) if fp8 else q), fp8


def _scale_strides(scale: torch.Tensor, fp8: bool) -> tuple[int, int]:
    """(stride between experts, stride between row blocks) of a contiguous scale tensor."""
    if fp8:
        return (scale.stride(0) if scale.dim() == 3 else 0), scale.stride(-2)
    return (scale.stride(0) if scale.dim() == 2 else 0), 1


def wq_matmul(x_MK: torch.Tensor, q_NK: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    M, K = x_MK.shape
    N = q_NK.shape[0]
    codes, fp8 = _codes(q_NK.contiguous())
    x_MK, scale = x_MK.contiguous(), scale.contiguous().float()
    y = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    block_m = 16 if M <= 16 else 32
    grid = (triton.cdiv(N, 64), triton.cdiv(M, block_m))
    _wq_matmul_kernel[grid](x_MK, codes, scale, y, M, N, _scale_strides(scale, fp8)[1], K=K, FP8=fp8,
                            BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128)
    return y


def wq_moe_experts(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                   gate_up_q: torch.Tensor, gate_up_scale: torch.Tensor, down_q: torch.Tensor,
                   down_scale: torch.Tensor) -> torch.Tensor:
    T, D = x_TD.shape
    K = topk_idx_TK.shape[1]
    F = down_q.shape[2]
    N = T * K
    gu, fp8 = _codes(gate_up_q.contiguous())
    dn, _ = _codes(down_q.contiguous())
    gu_s, dn_s = gate_up_scale.contiguous().float(), down_scale.contiguous().float()
    idx = topk_idx_TK.reshape(-1).contiguous()
    x_TD = x_TD.contiguous()
    h = torch.empty(N, F, dtype=torch.float32, device=x_TD.device)
    y = torch.empty(N, D, dtype=torch.float32, device=x_TD.device)
    if N:
        _wq_moe_up_kernel[(triton.cdiv(F, 32), N)](x_TD, idx, gu, gu_s, h, *_scale_strides(gu_s, fp8), TOP_K=K,
                                                    F=F, D=D, FP8=fp8, BLOCK_F=32, BLOCK_D=128)
        _wq_moe_down_kernel[(triton.cdiv(D, 32), N)](h, idx, dn, dn_s, y, *_scale_strides(dn_s, fp8), F=F, D=D,
                                                      FP8=fp8, BLOCK_D=32, BLOCK_F=128)
    return (y.view(T, K, D) * topk_weight_TK.float()[..., None]).sum(1).to(x_TD.dtype)
