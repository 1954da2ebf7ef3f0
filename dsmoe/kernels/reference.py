"""Plain-PyTorch reference of every MoE op: the spec the fast paths are tested against.

Shape suffixes: T tokens, D model dim, E routed experts, K experts per token, F expert hidden dim,
N = T*K routed rows. Expert weights are stacked as in transformers 5: gate_up_EFD [E, 2F, D] (rows
[gate; up]) and down_EDF [E, D, F], both [out, in] per expert like nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(h_N2F: torch.Tensor) -> torch.Tensor:
    gate, up = h_N2F.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts_reference(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor,
) -> torch.Tensor:
    """y_t = sum_k w_tk * Expert_{idx_tk}(x_t), one expert at a time, accumulated in fp32."""
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(gate_up_EFD.shape[0]):
        token, slot = torch.where(topk_idx_TK == e)
        if token.numel() == 0:
            continue
        h = swiglu(x_TD[token] @ gate_up_EFD[e].t()) @ down_EDF[e].t()
        y_TD = y_TD.index_add(0, token, h.float() * topk_weight_TK[token, slot, None].float())
    return y_TD.to(x_TD.dtype)
