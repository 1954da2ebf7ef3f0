"""What `dsmoe train` and `dsmoe finetune` print before their first step: the model, the data and the plan."""

from __future__ import annotations

from dsmoe.model.router import adaptive_start_note


def pretraining(trainer) -> str:
    c, cfg = trainer.model_config, trainer.cfg
    mtp = sum(p.numel() for p in trainer.model.mtp.parameters()) if c.num_nextn_predict_layers else 0
    mtp = f" + {mtp / 1e6:.1f}M in {c.num_nextn_predict_layers} MTP module(s)" if mtp else ""
    return (f"model: {cfg.preset} preset, {c.num_params() / 1e6:.1f}M parameters "
            f"({c.num_params(active=True) / 1e6:.1f}M active){mtp}, vocab {c.vocab_size}\n"
            f"data: {trainer.data.description}\n"
            + plan(trainer, f"{trainer.sequences_per_step * cfg.seq_len:,} tokens")
            + (adaptive_start_note(c) if trainer.step == 0 else ""))


def plan(trainer, per_step: str) -> str:
    """The plan line: steps x what one step trains on, where and how, into which folder."""
    return (f"plan: {trainer.total_steps} steps x {per_step} on {placement(trainer)} ({execution(trainer)}) "
            f"-> {trainer.out}")


def execution(trainer) -> str:
    """How each step computes: the precision, and whether the blocks (or the model) are compiled."""
    cfg = trainer.cfg
    precision = ("bf16 weights" if cfg.param_dtype == "bf16" else "bf16 autocast" if trainer.autocast_dtype
                 else "fp32")
    return precision + (f", compiled ({cfg.compile_scope})" if cfg.compile else "")


def placement(trainer) -> str:
    """Where the steps run: the device, or the ranks and their layout under torchrun."""
    if not trainer.distributed:
        return str(trainer.device)
    dims = trainer.reducer.mesh.dims
    return (f"{trainer.reducer.world_size} ranks ({trainer.device.type}, expert parallel {dims.ep} x data parallel "
            f"{dims.dp}, {trainer.grad_accum} micro-batches of {trainer.cfg.micro_batch} per rank)")
