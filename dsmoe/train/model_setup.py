"""The model as the trainer runs it: built from the seed, with dropout hooks, activation checkpointing and
compile in one process; under torchrun sharded by dsmoe.distributed.parallelize (EP, FSDP2, AC, compile).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dsmoe.config import ModelConfig
from dsmoe.model.transformer import Transformer, build_model
from dsmoe.train.config import TrainConfig


def build_training_model(config: ModelConfig, cfg: TrainConfig, device: torch.device, reducer, grad_accum: int,
                         sharded_init: bool = False) -> tuple[Transformer, torch.nn.Module]:
    """-> (model, the callable that runs its forward). With several ranks every rank builds the same weights
    from the seed, so a sharded run starts where one process would; sharded_init instead builds on the meta
    device and initialises each rank's shards after sharding (models that do not fit whole on one GPU)."""
    distributed = reducer.world_size > 1
    torch.manual_seed(cfg.seed)
    if distributed and sharded_init:
        with torch.device("meta"):
            model = Transformer(config, cfg.moe_impl)
    else:
        model = build_model(config, device, moe_impl=cfg.moe_impl)
    model.set_aux_loss_scale(1.0 / grad_accum)
    if cfg.dropout > 0:
        add_dropout(model, cfg.dropout)
    if not distributed:
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        return model, torch.compile(model) if cfg.compile else model
    from dsmoe.distributed.parallelize import parallelize

    parallelize(model, reducer.mesh, ac=cfg.activation_checkpointing, compile=cfg.compile)
    if sharded_init:
        model.to_empty(device=device)
        model.init_weights()
    # the ranks drew the same weights; from here on each rank draws its own dropout masks
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, reducer.rank]).generate_state(1)[0]))
    return model, model


def checkpoint_blocks(model: Transformer) -> None:
    """Activation checkpointing: each block keeps only its input and recomputes the rest in backward.
    The routing statistics survive: recomputation routes identically and rewrites the same values."""
    for block in model.blocks():
        block.forward = lambda *args, _forward=block.forward, **kw: checkpoint(_forward, *args, use_reentrant=False,
                                                                              **kw)


def add_dropout(model: Transformer, p: float) -> None:
    """Dropout where nanoGPT puts it: on the embeddings and on each attention and MLP/MoE output before it joins
    the residual stream. Forward hooks, so the model code and its checkpoints stay as they are; off in eval()."""
    def hook(module, args, output):
        return F.dropout(output, p, module.training)

    model.embed_tokens.register_forward_hook(hook)
    for block in model.blocks():
        block.self_attn.register_forward_hook(hook)
        block.mlp.register_forward_hook(hook)
