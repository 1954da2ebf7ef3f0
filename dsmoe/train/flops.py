"""Model FLOPs for MFU, and the dense bf16 GEMM rate that MFU is measured against.

Training FLOPs per token = 6 * N_matmul + attention, where
- N_matmul counts the weights one token multiplies through: the attention projections (MLA: q or q_a/q_b,
  kv_a, kv_b, o), every dense MLP, in each MoE layer the router (D x E), the shared experts and the K routed
  experts it is sent to (3 * D * F each), and lm_head. Embedding lookups and norms are not matmuls;
  experts a token is not routed to do no work for it. Each MTP module adds one MoE block, its eh_proj
  (2D x D) and one more pass through lm_head. 6 = 2 (multiply-add) x 3 (forward, input gradient,
  weight gradient).
- attention = 3 (fwd + bwd) x 2 x L x H x (d_qk + d_v) x (S + 1) / 2: QK^T and PV over the causal half of
  the sequence (a query at position i sees i + 1 keys). PaLM's 12*L*H*d*S counts the full square; we count
  the work causal kernels do.
Recomputation (activation checkpointing) and padding are not counted: these are model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import functools
import time

import torch

from dsmoe.config import ModelConfig

H200_BF16_SPEC_TFLOPS = 989.0  # dense BF16 without sparsity, the H100/H200 SXM spec sheet


def matmul_params_per_token(c: ModelConfig) -> int:
    d = c.hidden_size
    attention = c._attention_params() - (c.kv_lora_rank or 0) - (c.q_lora_rank or 0)  # minus MLA's two norms
    D = c.num_nextn_predict_layers
    total = c.vocab_size * d * (1 + D) + 2 * d * d * D  # lm_head per prediction, the MTP eh_proj
    for i in range(c.num_hidden_layers + D):
        total += attention
        if c.is_moe_layer(i):
            total += d * c.n_routed_experts + 3 * d * c.moe_intermediate_size * (c.num_experts_per_tok
                                                                                  + c.n_shared_experts)
        else:
            total += 3 * d * c.intermediate_size
    return total


def attention_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    v_dim = c.v_head_dim if c.use_mla else c.head_dim
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    return 3 * 2 * layers * c.num_attention_heads * (c.qk_head_dim + v_dim) * (seq_len + 1) / 2


def train_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    return 6 * matmul_params_per_token(c) + attention_flops_per_token(c, seq_len)


def measure_dense_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                         iters: int = 20) -> float:
    """Achieved TFLOP/s of a square n x n x n GEMM on a CUDA device: the ceiling a whole model can approach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


@functools.cache
def _dense_tflops(device: str) -> float:
    return measure_dense_tflops(torch.device(device))


def dense_tflops(device: torch.device) -> float:
    """The dense bf16 GEMM rate of this CUDA device, measured the first time it is asked for in this process
    (about a second) and remembered: every MFU in the process is relative to the same number."""
    return _dense_tflops(str(device))
