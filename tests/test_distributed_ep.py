"""Expert parallelism (+ FSDP2) on 2 and 4 CPU processes equals one process: forward output, loss, every
gradient, with the exact dispatch and with the sync-free one at a capacity that cannot overflow; device-limited
routing bounds the ranks a token reaches; ranks and experts without tokens work; adaptive routing's unused slots
are not sent."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from distributed_common import (CFG, MICRO_BATCH, SEQ, full, gather_rows, lm_loss, make_model, micro_batch,
                                reference_step, skew_routing)
from dsmoe.distributed.mesh import ParallelDims, build_mesh
from dsmoe.distributed.parallelize import parallelize
from dsmoe.distributed.testing import run_distributed

SCENARIOS = {  # name -> (config, skewed routing, sync-free dispatch with capacity factor = EP degree: no drops)
    "balanced": (CFG, False, False),
    "skewed": (CFG, True, False),  # experts 4-7 and the ranks holding them get no tokens
    "unlimited": (CFG.replace(topk_group=CFG.n_group), False, False),  # no device limit: shows the bound can fail
    "skewed, sync-free": (CFG, True, True),
    # adaptive routing: tokens use 1 to 4 of the K = 4 slots; unused slots are not sent
    "adaptive": (CFG.replace(num_experts_per_tok=4, routing_top_p=0.3, routing_min_k=1, routing_target_k=2.0,
                             routing_k_loss_alpha=0.01), False, False),
}


def _ep_worker(rank: int, world: int, out_file: str) -> None:
    mesh = build_mesh(ParallelDims(world, ep=world), "cpu")
    results = {}
    for name, (config, skewed, bounded) in SCENARIOS.items():
        model = make_model(config=config)
        if skewed:
            skew_routing(model)
        dims = ParallelDims(world, ep=world, ep_capacity_factor=world if bounded else None)
        parallelize(model, dataclasses.replace(mesh, dims=dims), ep_tokens=MICRO_BATCH * SEQ)
        assert all(m.experts.bounded == bounded for m in model.moe_layers())
        loss, logits = lm_loss(model, micro_batch(0, rank))
        loss.backward()
        # per MoE layer: most ranks one token reached, pairs sent, sum of ranks reached, pairs received
        stats = torch.tensor([[int(m.experts.last_ranks_per_token.max()), sum(m.experts.last_send_pairs),
                               int(m.experts.last_ranks_per_token.sum()), sum(m.experts.last_recv_pairs)]
                              for m in model.moe_layers()])
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        result = {"loss": mean_loss / world, "logits": gather_rows(logits), "stats": gather_rows(stats[None])}
        if name != "unlimited":
            result["grads"] = {n: full(p.grad) for n, p in model.named_parameters()}
        results[name] = result
    if rank == 0:
        torch.save(results, out_file)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(world, tmp_path):
    out_file = tmp_path / "results.pt"
    run_distributed(_ep_worker, world, str(out_file), timeout_s=90)
    results = torch.load(out_file, weights_only=True)

    for name in ("balanced", "skewed", "skewed, sync-free", "adaptive"):
        config, skewed, _ = SCENARIOS[name]
        ref = make_model(config=config)
        if skewed:
            skew_routing(ref)
        for moe in ref.moe_layers():  # the balance losses see the devices EP uses
            moe.experts_per_device = config.n_routed_experts // world
        loss, logits, counts = reference_step(ref, 0, world)
        got = results[name]
        assert got["loss"].item() == pytest.approx(loss, rel=1e-6), name
        torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=1e-5, msg=name)
        for pname, p in ref.named_parameters():
            torch.testing.assert_close(got["grads"][pname], p.grad, atol=1e-6, rtol=1e-4,
                                       msg=f"{name}: gradient of {pname}")
        if skewed:
            assert counts[:, 4:].sum() == 0  # the scenario really starves experts 4-7
            for pname, g in got["grads"].items():
                if pname.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                    assert g[4:].abs().max() == 0, pname

    # stats: [rank, MoE layer, (max ranks per token, pairs sent, sum of ranks per token, pairs received)]
    for name, got in results.items():
        stats = got["stats"]
        if "sync-free" not in name:  # (its splits are the capacity)
            assert torch.equal(stats[..., 1], stats[..., 2]), name  # one row per (token, rank) reached
        assert stats[..., 1].sum() == stats[..., 3].sum(), name  # every row sent arrives
    limit = min(CFG.num_experts_per_tok, CFG.topk_group * -(-world // CFG.n_group))
    assert results["balanced"]["stats"][..., 0].max() <= limit
    if world == 4:  # 4 groups = 4 devices, 2 per token: M = 2 < K = 3
        assert limit == 2
        assert results["unlimited"]["stats"][..., 0].max() > limit
    skew = results["skewed"]["stats"]
    starved = range(world // 2, world)  # ranks holding experts 4-7
    assert all(skew[r, :, 3].sum() == 0 for r in starved)
