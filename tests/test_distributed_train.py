"""FSDP2 + EP training on 4 CPU processes equals one process step for step; its DCP checkpoint reshards to
2 processes (which resume training with activation checkpointing) and to 1; the hub export of
the sharded model loads with load_pretrained."""

from __future__ import annotations

import pytest
import torch

from distributed_common import full, gather_rows, lm_loss, make_model, micro_batch, reference_step
from dsmoe.checkpoint.hf import load_pretrained, save_pretrained
from dsmoe.checkpoint.training import load_checkpoint, save_checkpoint
from dsmoe.distributed.parallelize import parallelize
from dsmoe.distributed.runtime import clip_grad_norm_, init_from_env
from dsmoe.distributed.testing import run_distributed

STEPS, LR, MAX_NORM, GAMMA = 5, 1e-2, 0.05, 1e-2  # MAX_NORM small enough that clipping acts
CHECK_STEP = 99  # the batch whose logits are compared after loading


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def distributed_step(model, opt, rt, step: int) -> tuple[float, float]:
    """One step as a trainer runs it under torchrun: local micro-batch, clipped sharded gradients, the
    aux-free bias update from the expert counts of the whole global batch. Returns (loss, gradient norm):
    AdamW hides a wrongly scaled gradient, the norm does not."""
    loss, _ = lm_loss(model, micro_batch(step, rt.data_rank))
    loss.backward()
    norm = clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()
    opt.zero_grad()
    model.update_expert_bias(rt.sum(model.routing_stats()[0]), GAMMA)
    return rt.mean(loss.detach()).item(), norm.item()


def reference_train_step(model, opt, step: int, world: int) -> tuple[float, float]:
    loss, _, counts = reference_step(model, step, world)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()
    opt.zero_grad()
    model.update_expert_bias(counts, GAMMA)
    return loss, norm.item()


def check_logits(model, rank: int, world: int) -> torch.Tensor:
    """Logits of the 4 check micro-batches, this rank's share computed here, gathered in rank order."""
    share = 4 // world
    ids = torch.cat([micro_batch(CHECK_STEP, r) for r in range(rank * share, (rank + 1) * share)])
    model.eval()
    with torch.no_grad():
        logits = model(ids)
    model.train()
    return gather_rows(logits) if world > 1 else logits


def _train_and_save(rank: int, world: int, folder: str) -> None:
    rt = init_from_env(ep=2, device_type="cpu")  # 4 ranks: dp_shard 2 x ep 2 (gloo, also where GPUs are)
    model = parallelize(make_model(), rt.mesh)
    opt = make_optimizer(model)
    losses_and_norms = [distributed_step(model, opt, rt, step) for step in range(STEPS)]
    params = {n: full(p) for n, p in model.named_parameters()}
    logits = check_logits(model, rank, world)
    save_checkpoint(f"{folder}/ckpts", STEPS, model, opt, {"note": "four"})
    save_pretrained(model, f"{folder}/hub", max_shard_size=30_000)  # several files
    if rank == 0:
        torch.save({"losses": torch.tensor(losses_and_norms), "params": params, "logits": logits}, f"{folder}/four.pt")


def _load_and_resume(rank: int, world: int, folder: str) -> None:
    rt = init_from_env(ep=2, device_type="cpu")  # 2 ranks: ep 2
    model = parallelize(make_model(seed=7), rt.mesh, ac=True)
    opt = make_optimizer(model)
    extra = load_checkpoint(f"{folder}/ckpts/step_{STEPS}", model, opt)
    logits = check_logits(model, rank, world)
    loss = torch.tensor(distributed_step(model, opt, rt, STEPS))
    params = {n: full(p) for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"extra": [extra["step"], extra["note"]], "logits": logits, "loss": loss, "params": params},
                   f"{folder}/two.pt")


@pytest.mark.slow
def test_fsdp_ep_training_equals_one_process_and_checkpoints_reshard(tmp_path):
    run_distributed(_train_and_save, 4, str(tmp_path), timeout_s=120)
    four = torch.load(tmp_path / "four.pt", weights_only=True)
    ref = make_model()
    for moe in ref.moe_layers():
        moe.experts_per_device = ref.config.n_routed_experts // 2  # EP = 2 in the 4-rank run
    opt = make_optimizer(ref)
    ref_losses = [reference_train_step(ref, opt, step, 4) for step in range(STEPS)]
    torch.testing.assert_close(four["losses"], torch.tensor(ref_losses), atol=1e-6, rtol=1e-5)
    for name, p in ref.named_parameters():  # Adam magnifies rounding where gradients are tiny: atol 5e-5
        torch.testing.assert_close(four["params"][name], p.detach(), atol=5e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(four["logits"], check_logits(ref, 0, 1), atol=5e-4, rtol=1e-4)

    # world size 4 -> 2 (which resumes for one step) and 4 -> 1 (no process group): the same logits; the
    # step resumed at 2 equals the same step resumed at 1 from the same checkpoint
    run_distributed(_load_and_resume, 2, str(tmp_path), timeout_s=120)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert two["extra"] == [STEPS, "four"]
    torch.testing.assert_close(two["logits"], four["logits"], atol=1e-6, rtol=1e-6)
    single = make_model(seed=9)
    single_opt = make_optimizer(single)
    assert load_checkpoint(tmp_path / "ckpts" / f"step_{STEPS}", single, single_opt)["world_size"] == 4
    for moe in single.moe_layers():
        moe.experts_per_device = single.config.n_routed_experts // 2
    torch.testing.assert_close(check_logits(single, 0, 1), four["logits"], atol=1e-6, rtol=1e-6)
    assert single_opt.state_dict()["state"][0]["step"].item() == STEPS
    resumed = torch.tensor(reference_train_step(single, single_opt, STEPS, 2))
    torch.testing.assert_close(two["loss"], resumed, atol=1e-6, rtol=1e-5)
    for name, p in single.named_parameters():
        torch.testing.assert_close(two["params"][name], p.detach(), atol=5e-5, rtol=1e-4, msg=name)

    hub = load_pretrained(tmp_path / "hub", moe_impl="grouped")
    assert len(list((tmp_path / "hub").glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(check_logits(hub, 0, 1), four["logits"], atol=1e-6, rtol=1e-6)
