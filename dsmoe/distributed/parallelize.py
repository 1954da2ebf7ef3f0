"""Parallelism applied from outside the model, in a fixed order: EP -> activation checkpointing -> compile ->
FSDP2 (torchtitan's order: FSDP wraps last so its hooks see the final modules).

Works on a materialised model (each rank keeps its slices and drops the rest) and on one built on the meta
device (then `model.to_empty(device=...)` and `model.init_weights()` after `parallelize`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import Shard

from dsmoe.distributed.expert_parallel import ExpertParallelExperts, apply_ep
from dsmoe.distributed.mesh import ParallelMesh
from dsmoe.errors import UserError
from dsmoe.model.classifier import SequenceClassifier
from dsmoe.model.moe import MoE


def apply_ac(model: nn.Module) -> None:
    """Recompute each block's activations in backward (composable checkpointing keeps parameter names).
    Under EP the recomputed forward repeats its all-to-alls; every rank recomputes the same blocks in the
    same order, and routing is deterministic, so the splits match."""
    from torch.distributed._composable import checkpoint

    for block in model.blocks():
        checkpoint(block)


COMPILE_SCOPES = ("blocks", "model")


def apply_compile(model: nn.Module, backend: str = "inductor", scope: str = "blocks") -> None:
    """torch.compile in place (names unchanged). scope "blocks": each block on its own, as torchtitan does (every
    block has the same code, so one compilation serves them all; the exact expert-parallel dispatch reads split
    sizes on the host, so dynamo breaks the graph there and compiles the pieces around it; the capacity-bounded
    one reads nothing on the host). scope "model": the whole forward in one graph, one process only (kept to
    measure it against "blocks")."""
    if scope == "model":
        model.compile(backend=backend)
        return
    for block in model.blocks():
        block.compile(backend=backend)


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> None:
    """FSDP2 `fully_shard` per block, then the root (embedding, final norm, head).

    Dense weights are sharded over every rank. Expert-parallel experts form their own group, sharded over
    the ranks that hold the same experts (mesh.dp_mesh); their gradients sum the contributions of all
    ranks' tokens (they arrived by all-to-all), so they are divided by the world size, like the dense ones.
    The router forms its own group and is never cast: routing stays fp32 under a bf16 param_dtype, as in
    the single-device model.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    keep_fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    world = mesh.dims.world_size
    for block in model.blocks():
        moe = block.mlp
        if isinstance(moe, MoE):
            fully_shard(moe.gate, mesh=mesh.fsdp_mesh, mp_policy=keep_fp32,
                        reshard_after_forward=reshard_after_forward)
            if isinstance(moe.experts, ExpertParallelExperts):
                dp = mesh.dims.dp
                # whole experts per rank when they divide evenly; else split each expert's rows (no padding)
                placement = Shard(0) if moe.experts.local_experts % dp == 0 else Shard(1)
                fully_shard(moe.experts, mesh=mesh.dp_mesh, mp_policy=mp,
                            shard_placement_fn=lambda p, placement=placement: placement,
                            reshard_after_forward=reshard_after_forward)
                moe.experts.set_gradient_divide_factor(world)
                if mesh.dp_mesh.device_type == "cpu" and dp > 1:
                    # gloo has no PREMUL_SUM. (Not with dp == 1: torch 2.13 then divides twice.)
                    moe.experts.set_force_sum_reduction_for_comms(True)
        if hasattr(block, "shared_head"):  # an MTP module's output norm runs after its forward: its own group
            fully_shard(block.shared_head.norm, mesh=mesh.fsdp_mesh, mp_policy=mp,
                        reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=mesh.fsdp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh.fsdp_mesh, mp_policy=mp, reshard_after_forward=False)
    if isinstance(model, SequenceClassifier):  # its entry point is classify(), which FSDP must gather around too
        register_fsdp_forward_method(model, "classify")


def parallelize(model: nn.Module, mesh: ParallelMesh | None, *, ac: bool = False, compile: bool = False,
                param_dtype: torch.dtype | None = None, compile_backend: str = "inductor",
                compile_scope: str = "blocks", ep_tokens: int | None = None) -> nn.Module:
    """Apply everything, in the fixed order. mesh None (or one rank): only AC and compile. ep_tokens: the most
    tokens one forward routes on a rank (sizes the buffers of the capacity-bounded dispatch, when the mesh asks
    for it). Returns the model, changed in place."""
    distributed = mesh is not None and mesh.dims.world_size > 1
    if compile and distributed and compile_scope != "blocks":
        raise UserError(f"--compile-scope {compile_scope} is for one process; under torchrun each block is "
                        "compiled on its own (--compile-scope blocks)")
    if distributed:
        mesh.dims.check_experts(model.config.n_routed_experts)
        if mesh.dims.ep > 1:
            apply_ep(model, mesh.ep_mesh, mesh.dims.ep_capacity_factor, ep_tokens)
    if ac:
        apply_ac(model)
    if compile:
        apply_compile(model, compile_backend, compile_scope)
    if distributed:
        apply_fsdp(model, mesh, param_dtype=param_dtype)
    return model
