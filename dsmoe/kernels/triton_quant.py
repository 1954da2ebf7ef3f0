"""Triton kernels for weight-only fp8 / int8 at decode shapes: read the codes, dequantise in registers.

At one to a few dozen tokens a step is bound by the bytes of weights it reads, so the win of low precision
is reading 1 byte per weight instead of 2, which only a kernel that dequantises while loading achieves
(dequantising into a bf16 copy first would move 5 bytes per weight). Formats and the reference maths are in
`dsmoe.kernels.quant` (`dequantize`); fp8 scales are per 128x128 block, int8 scales per output row.

- `wq_matmul`: y[M, N] = x[M, K] @ W[N, K]^T for small M (tensor-core dot on bf16(codes), fp32 accumulate,
  the scale applied to each K-block's partial product); the column tile is autotuned per shape, since one
  token's projection has too few 64-wide tiles to keep every SM reading.
The routed experts of a MoE layer at decode shapes run the kernels of `triton_moe_decode`, which read plain
weights and these codes alike (`load_codes`, `row_scale` below).
fp8 codes are passed as uint8 and bitcast in the kernel. The model dims are compile-time constants (a handful
of shapes per model), which also lets the K loops unroll.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsmoe.kernels.triton_configs import WQ_CONFIGS, dot_precision, prune_decode_configs, tolerant_bench

SCALE_BLOCK = 128


@triton.jit
def load_codes(ptrs, mask, FP8: tl.constexpr):
    q = tl.load(ptrs, mask=mask, other=0)
    if FP8:
        q = q.to(tl.float8e4nv, bitcast=True)
    return q.to(tl.float32)


@triton.autotune(configs=WQ_CONFIGS, key=["N", "K", "FP8", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": prune_decode_configs}, do_bench=tolerant_bench)
@triton.jit(do_not_specialize=["M"])
def _wq_matmul_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, s_stride, K: tl.constexpr,
                      FP8: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = load_codes(q_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], n_ok[:, None] & k_ok[None, :],
                        FP8).to(x.dtype)
        part = tl.dot(x, tl.trans(w), input_precision=PRECISION)
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
def row_scale(s_ptr, e, rows, rows_ok, k0, s_stride_e, s_stride_r, FP8: tl.constexpr):
    """The scale of each row's current K-block (fp8) or of each row (int8), for expert e."""
    if FP8:
        return tl.load(s_ptr + e * s_stride_e + (rows // 128) * s_stride_r + k0 // 128, mask=rows_ok, other=0.0)
    return tl.load(s_ptr + e * s_stride_e + rows, mask=rows_ok, other=0.0)


def codes_view(q: torch.Tensor) -> tuple[torch.Tensor, bool]:
    fp8 = q.dtype == torch.float8_e4m3fn
    return (q.view(torch.uint8) if fp8 else q), fp8


def scale_strides(scale: torch.Tensor, fp8: bool) -> tuple[int, int]:
    """(stride between experts, stride between row blocks) of a contiguous scale tensor."""
    if fp8:
        return (scale.stride(0) if scale.dim() == 3 else 0), scale.stride(-2)
    return (scale.stride(0) if scale.dim() == 2 else 0), 1


def wq_matmul(x_MK: torch.Tensor, q_NK: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    M, K = x_MK.shape
    N = q_NK.shape[0]
    codes, fp8 = codes_view(q_NK.contiguous())
    x_MK, scale = x_MK.contiguous(), scale.contiguous().float()
    y = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    block_m = 16 if M <= 16 else 32

    def grid(meta):
        return triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m)

    _wq_matmul_kernel[grid](x_MK, codes, scale, y, M, N, scale_strides(scale, fp8)[1], K=K, FP8=fp8,
                            PRECISION=dot_precision(x_MK.dtype), BLOCK_M=block_m)
    return y
