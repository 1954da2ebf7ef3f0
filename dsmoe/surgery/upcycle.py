"""Upcycling: a dense model becomes a DeepSeekMoE model by fine-grained segmentation of each dense FFN.

A SwiGLU FFN is a sum over its hidden units, down(silu(gate x) * up x) = sum over pieces of the same with
the rows of gate/up and the columns of down restricted to that piece. Cutting the hidden dimension I into
E + S pieces of I / (E + S) therefore gives E routed experts and S shared ones (merged, as DeepSeek stores
them) whose sum is exactly the dense FFN. The router is the V3 one (sigmoid scores, selection bias, weights
renormalised over the K chosen and scaled by K): with a zero router every score is 0.5 and every chosen
expert's weight exactly 1, so with K = E the upcycled model computes the dense model's function exactly; with
K < E a token sees S + K of the E + S pieces (the gap is measured and reported). The default router starts
from small random weights (the model's init std) so that tokens differ in their experts from step 0.
"""

from __future__ import annotations

import torch

from dsmoe.model.layers import MLP
from dsmoe.model.transformer import Transformer
from dsmoe.surgery.experts import SurgeryError, rebuild


@torch.no_grad()
def upcycle(model: Transformer, *, experts: int, top_k: int, shared: int = 1, keep_dense: int = 1,
            router_init: str = "random", seed: int = 0) -> Transformer:
    """Every dense layer from `keep_dense` on becomes a MoE layer of `experts` routed + `shared` shared
    experts cut from its FFN, `top_k` routed experts per token."""
    c = model.config
    if c.num_nextn_predict_layers:
        raise SurgeryError("upcycling a model with MTP modules is not supported; drop them first "
                           "(num_nextn_predict_layers=0)")
    layers = list(range(keep_dense, c.num_hidden_layers))
    if not layers:
        raise SurgeryError(f"--keep-dense {keep_dense} keeps all {c.num_hidden_layers} layers dense; lower it")
    already = [i for i in layers if not isinstance(model.layers[i].mlp, MLP)]
    if already:
        raise SurgeryError(f"layers {already[:4]} are MoE layers already; upcycle converts dense layers only "
                           f"(use --keep-dense to start past them, or prune/grow to change a MoE model)")
    pieces = experts + shared
    if experts < 1 or shared < 0 or not 1 <= top_k <= experts:
        raise SurgeryError("need --experts >= 1, --shared >= 0 and 1 <= --top-k <= --experts")
    if c.intermediate_size % pieces:
        raise SurgeryError(f"the dense FFN width {c.intermediate_size} does not split into {pieces} equal pieces "
                           f"(--experts + --shared); choose a divisor of {c.intermediate_size}")
    if router_init not in ("random", "zero"):
        raise SurgeryError("--router-init is random or zero")
    width = c.intermediate_size // pieces
    new = c.replace(n_routed_experts=experts, n_shared_experts=shared, num_experts_per_tok=top_k,
                    moe_intermediate_size=width, first_k_dense_replace=keep_dense, moe_layer_freq=1,
                    scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                    routed_scaling_factor=float(top_k), n_group=1, topk_group=1)
    g = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in model.state_dict().items() if not _in_converted_mlp(k, layers)}
    for i in layers:
        mlp = model.layers[i].mlp
        gate = mlp.gate_proj.weight.view(pieces, width, c.hidden_size)
        up = mlp.up_proj.weight.view(pieces, width, c.hidden_size)
        down = mlp.down_proj.weight.view(c.hidden_size, pieces, width).transpose(0, 1)  # [pieces, D, width]
        p = f"layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.cat([gate[shared:], up[shared:]], dim=1).clone()
        state[p + "experts.down_proj"] = down[shared:].contiguous()
        if shared:
            state[p + "shared_experts.gate_proj.weight"] = gate[:shared].reshape(-1, c.hidden_size).clone()
            state[p + "shared_experts.up_proj.weight"] = up[:shared].reshape(-1, c.hidden_size).clone()
            state[p + "shared_experts.down_proj.weight"] = down[:shared].transpose(0, 1).reshape(
                c.hidden_size, -1).contiguous()
        router = torch.zeros(experts, c.hidden_size)
        if router_init == "random":
            router.normal_(std=c.initializer_range, generator=g)
        state[p + "gate.weight"] = router.to(device=gate.device)
        state[p + "gate.e_score_correction_bias"] = torch.zeros(experts, device=gate.device)
    return rebuild(new, state, model)


def _in_converted_mlp(key: str, layers: list[int]) -> bool:
    parts = key.split(".")
    return len(parts) > 2 and parts[0] == "layers" and int(parts[1]) in layers and parts[2] == "mlp"
