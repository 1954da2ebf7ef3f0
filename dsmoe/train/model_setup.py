"""The model as the trainer runs it: built from the seed, with dropout hooks, then handed to
dsmoe.distributed.parallelize, which applies activation checkpointing and compile (and, under torchrun, EP and
FSDP2) the same way for one process and for N.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dsmoe.config import ModelConfig
from dsmoe.distributed.parallelize import parallelize
from dsmoe.model.transformer import Transformer, build_model, cast_model
from dsmoe.train.config import TrainConfig

PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build_training_model(config: ModelConfig, cfg: TrainConfig, device: torch.device, reducer, grad_accum: int,
                         sharded_init: bool = False) -> Transformer:
    """With several ranks every rank builds the same weights from the seed, so a sharded run starts where one
    process would; sharded_init instead builds on the meta device and initialises each rank's shards after
    sharding (models that do not fit whole on one GPU)."""
    distributed = reducer.world_size > 1
    param_dtype = PARAM_DTYPES[cfg.param_dtype]
    torch.manual_seed(cfg.seed)
    if distributed and sharded_init:
        with torch.device("meta"):
            model = Transformer(config, cfg.moe_impl)
        if param_dtype is not None:
            cast_model(model, param_dtype)
    else:
        model = build_model(config, device, dtype=param_dtype, moe_impl=cfg.moe_impl)
        if cfg.paired_init:
            seed_weights_by_name(model, cfg.seed)
    prepare_and_parallelize(model, cfg, reducer, grad_accum)
    if distributed and sharded_init:
        model.to_empty(device=device)
        model.init_weights()
    seed_per_rank(cfg.seed, reducer)
    return model


def prepare_and_parallelize(model: Transformer, cfg: TrainConfig, reducer, grad_accum: int) -> Transformer:
    """What every trained model gets, pretrained from the seed or fine-tuned from a base: the balance loss scaled
    for gradient accumulation, dropout, then parallelize() (EP and FSDP2 over reducer's mesh under torchrun)."""
    model.set_aux_loss_scale(1.0 / grad_accum)
    if cfg.dropout > 0:
        add_dropout(model, cfg.dropout)
    mesh = reducer.mesh if reducer.world_size > 1 else None
    return parallelize(model, mesh, ac=cfg.activation_checkpointing, compile=cfg.compile,
                       compile_scope=cfg.compile_scope, ep_tokens=cfg.micro_batch * cfg.seq_len)


def seed_per_rank(seed: int, reducer) -> None:
    """The ranks drew the same weights; from here on each rank draws its own dropout masks."""
    if reducer.world_size > 1:
        torch.manual_seed(int(np.random.SeedSequence([seed, reducer.rank]).generate_state(1)[0]))


@torch.no_grad()
def seed_weights_by_name(model: Transformer, seed: int) -> None:
    """Redraw every matrix outside the MLP/MoE blocks from a generator seeded by (seed, parameter name), with the
    init's distribution N(0, initializer_range): the draw no longer depends on what was built before it, so two
    models that differ only in their FFNs get the same embeddings, attention and head."""
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        if p.dim() < 2 or ".mlp." in name:
            continue
        state = np.random.SeedSequence([seed, *name.encode()]).generate_state(2, dtype=np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        p.copy_(torch.randn(p.shape, generator=generator).mul_(std))


def add_dropout(model: Transformer, p: float) -> None:
    """Dropout where nanoGPT puts it: on the embeddings and on each attention and MLP/MoE output before it joins
    the residual stream. Forward hooks, so the model code and its checkpoints stay as they are; off in eval()."""
    def hook(module, args, output):
        return F.dropout(output, p, module.training)

    model.embed_tokens.register_forward_hook(hook)
    for block in model.blocks():
        block.self_attn.register_forward_hook(hook)
        block.mlp.register_forward_hook(hook)
