"""Expert surgery: pruning with nothing pruned is an identity, pruning keeps the chosen experts' function,
growing keeps the output (exactly with a selection bias), upcycling keeps the dense function (exactly with
K = E), the results load in transformers with equal logits, and impossible requests get one clear error."""

import re

import pytest
import torch

from dsmoe import load_pretrained, save_pretrained
from dsmoe.config import ModelConfig
from dsmoe.model.transformer import build_model
from dsmoe.surgery.experts import (SurgeryError, grow_experts, prune_experts, select_highest, select_random)
from dsmoe.surgery.upcycle import upcycle

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128)
V3 = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
          scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.0)
V2 = dict(model_type="deepseek_v2", n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
          scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)


def make(extra, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**BASE, **extra}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)  # decisive routing, O(1) logits
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model.eval()


IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS)


def usage(model):
    with torch.no_grad():
        model(IDS)
    return model.routing_stats()[0].cpu()


def test_pruning_nothing_is_an_identity():
    model = make(V3)
    E = model.config.n_routed_experts
    same = prune_experts(model, [torch.arange(E)] * len(model.config.moe_layer_ids))
    assert torch.equal(logits(same), logits(model))


def test_pruning_keeps_the_most_used_experts_per_group_and_the_unpruned_tokens_agree():
    model = make(V3)
    counts = usage(model)
    kept = select_highest(counts, 4, n_group=2)
    for ids, c in zip(kept, counts):
        assert (ids < 4).sum() == 2 and (ids >= 4).sum() == 2  # two per group
        for g in range(2):
            in_group = [i for i in range(g * 4, g * 4 + 4)]
            top = sorted(in_group, key=lambda e: (-int(c[e]), e))[:2]
            assert sorted(top) == [int(i) for i in ids if i // 4 == g]
    pruned = prune_experts(model, kept)
    assert pruned.config.n_routed_experts == 4
    moe, old = pruned.moe_layers()[0], model.moe_layers()[0]
    assert torch.equal(moe.experts.down_proj, old.experts.down_proj[kept[0]])
    assert torch.equal(moe.gate.e_score_correction_bias, old.gate.e_score_correction_bias[kept[0]])
    assert torch.isfinite(logits(pruned)).all()
    random = prune_experts(model, select_random(2, 8, 4, 2))
    assert random.config.n_routed_experts == 4


@pytest.mark.parametrize("bad,match", [(9, "has 8"), (1, "num_experts_per_tok"), (3, "routing groups")])
def test_impossible_prunes_are_refused(bad, match):
    model = make(V3)
    kept = [torch.arange(bad) for _ in model.config.moe_layer_ids]
    with pytest.raises(SurgeryError, match=match):
        prune_experts(model, kept)


def test_growing_with_a_selection_bias_keeps_the_logits_exactly():
    model = make(V3)
    grown = grow_experts(model, 4, usage(model))
    assert grown.config.n_routed_experts == 12
    torch.testing.assert_close(logits(grown), logits(model), rtol=1e-6, atol=1e-6)  # same experts, same weights
    children = torch.tensor([4, 5, 10, 11])
    assert usage(grown)[:, children].sum() == 0 and usage(grown).sum() == usage(model).sum()
    # children sit at the end of their group and copy a busy parent's weights up to the jitter
    moe, old = grown.moe_layers()[0], model.moe_layers()[0]
    child, parents = moe.experts.gate_up_proj[4], old.experts.gate_up_proj[:4]
    nearest = (parents - child).flatten(1).norm(dim=1).min()
    assert 0 < nearest < 0.01 * child.norm()


def test_growing_a_softmax_router_moves_the_output_a_little():
    model = make(V2)
    grown = grow_experts(model, 2, usage(model))
    gap = ((logits(grown) - logits(model)).norm() / logits(model).norm()).item()
    assert 0 < gap < 0.5  # the copied router rows share their parents' probability mass


def test_grow_refuses_uneven_groups():
    model = make(V3)
    with pytest.raises(SurgeryError, match="multiple"):
        grow_experts(model, 3, usage(model))


def dense_model():
    return make(dict(n_routed_experts=None, intermediate_size=96))


def test_upcycling_with_every_expert_active_is_the_dense_function():
    dense = dense_model()
    moe = upcycle(dense, experts=4, top_k=4, shared=2, keep_dense=1, router_init="zero")
    assert moe.config.n_routed_experts == 4 and moe.config.moe_intermediate_size == 16
    assert len(moe.moe_layers()) == 2
    torch.testing.assert_close(logits(moe), logits(dense), rtol=1e-5, atol=1e-5)


def test_upcycling_with_fewer_active_experts_has_a_measured_gap():
    dense = dense_model()
    moe = upcycle(dense, experts=6, top_k=2, shared=2, keep_dense=1)
    gap = ((logits(moe) - logits(dense)).norm() / logits(dense).norm()).item()
    assert 0 < gap < 1


@pytest.mark.parametrize("kw,match", [(dict(experts=5, top_k=2, shared=2), "divisor"),
                                      (dict(experts=4, top_k=5, shared=2), "top-k"),
                                      (dict(experts=4, top_k=2, shared=2, keep_dense=3), "keeps all")])
def test_impossible_upcycles_are_refused(kw, match):
    with pytest.raises(SurgeryError, match=match):
        upcycle(dense_model(), **kw)


def test_upcycle_refuses_a_model_that_is_moe_already():
    with pytest.raises(SurgeryError, match="MoE layers already"):
        upcycle(make(V3), experts=4, top_k=2, shared=2, keep_dense=0)


@pytest.mark.parametrize("op", ["prune", "grow", "upcycle"])
def test_results_round_trip_and_load_in_transformers(tmp_path, op):
    transformers = pytest.importorskip("transformers")
    if op == "upcycle":
        result = upcycle(dense_model(), experts=4, top_k=2, shared=2)
    else:
        model = make(V3)
        result = prune_experts(model, select_highest(usage(model), 6, 2)) if op == "prune" \
            else grow_experts(model, 2, usage(model))
    save_pretrained(result, tmp_path)
    again = load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(logits(again), logits(result))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(IDS).logits
    torch.testing.assert_close(ref, logits(result), rtol=1e-4, atol=1e-4)


def test_cli_prune_writes_a_loadable_folder_with_provenance(tmp_path, model_dir, capsys):
    import json

    from dsmoe.cli import main

    src = model_dir
    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "pruned"
    args = ["experts", "prune", str(src), "--data", str(calib), "--keep", "4", "--seq-len", "64", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "random experts dropped instead" in printed
    record = json.loads((out / "surgery.json").read_text())
    assert record["kept_per_layer"] == 4 and record["loss_after"] > 0
    assert load_pretrained(out).config.n_routed_experts == 4
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".pruned.tmp-*"))
    assert record["by"] == "usage" and record["kept_experts"] == [
        ids.tolist() for ids in select_highest(torch.tensor(record["expert_tokens"]), 4, load_pretrained(src).config.n_group)]
    assert main(args) == 2  # refuses to overwrite without --overwrite
    assert main(args[:3] + ["--keep", "9", "--data", str(calib), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_removing_an_expert_no_token_chooses_costs_nothing():
    import numpy as np

    from dsmoe.analysis.probes import single_expert_removal
    from dsmoe.tasks.perplexity import evaluate_loss

    model = make(V3)
    with torch.no_grad():
        model.moe_layers()[0].gate.e_score_correction_bias[3] = -1e4  # expert 3 of the first MoE layer: never chosen
    windows = [row.numpy() for row in torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(2))]
    base = evaluate_loss(model, windows, batch_size=2, device=torch.device("cpu"))[0]
    rise = single_expert_removal(model, windows, baseline=base, batch_size=2, device=torch.device("cpu"))
    assert rise.shape == (2, 8) and abs(rise[0, 3]) < 1e-5 and (np.abs(rise) > 1e-3).sum() >= 8


def test_the_removal_cost_of_an_expert_is_the_loss_of_the_model_pruned_of_it():
    from dsmoe.analysis.probes import single_expert_removal
    from dsmoe.tasks.perplexity import evaluate_loss

    model = make({**V3, "n_group": 1, "topk_group": 1, "num_hidden_layers": 2})  # one MoE layer
    windows = [row.numpy() for row in torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(3))]
    kw = dict(batch_size=2, device=torch.device("cpu"))
    base = evaluate_loss(model, windows, **kw)[0]
    rise = single_expert_removal(model, windows, baseline=base, **kw)
    busiest = int(usage(model)[0].argmax())
    for expert in (busiest, (busiest + 3) % 8):
        pruned = prune_experts(model, [torch.tensor([e for e in range(8) if e != expert])])
        assert abs(evaluate_loss(pruned, windows, **kw)[0] - base - rise[0, expert]) < 1e-5
    assert abs(rise[0, busiest]) > 1e-3


def test_cli_prune_by_loss_keeps_the_experts_whose_removal_costs_most(tmp_path, model_dir, capsys):
    import json

    from dsmoe.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "pruned"
    assert main(["experts", "prune", str(model_dir), "--data", str(calib), "--keep", "4", "--seq-len", "64",
                 "--max-tokens", "512", "--by", "loss", "--out", str(out)]) == 0
    assert "after (kept by loss)" in capsys.readouterr().out
    record = json.loads((out / "surgery.json").read_text())
    rise = torch.tensor(record["expert_removal_loss_rise"])
    config = load_pretrained(model_dir).config
    assert record["by"] == "loss" and rise.shape == (len(config.moe_layer_ids), config.n_routed_experts)
    assert record["kept_experts"] == [ids.tolist() for ids in select_highest(rise, 4, config.n_group)]
    assert record["kept_experts"] != [ids.tolist() for ids in select_highest(torch.tensor(record["expert_tokens"]), 4,
                                                                          config.n_group)]


@pytest.mark.parametrize("extra,match", [
    (["prune", "--keep", "4", "--seq-len", "0"], "--seq-len 0: a calibration window"),
    (["prune", "--keep", "4", "--max-tokens", "-5"], "--max-tokens -5 is below --seq-len 512"),
    (["prune", "--drop-fraction", "nan"], r"--drop-fraction is a share in \[0, 1\)"),
    (["prune", "--keep", "4", "--seq-len", "4096", "--max-tokens", "8192"], "beyond the model's max_position"),
    (["grow", "--add", "2", "--noise", "-1"], "--noise is a non-negative"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_cli_refuses_bad_numbers_in_one_sentence(tmp_path, model_dir, capsys, extra, match):
    from dsmoe.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 50)
    action, rest = extra[0], extra[1:]
    out = tmp_path / "out"
    assert main(["experts", action, str(model_dir), "--data", str(calib), "--out", str(out), *rest]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and not out.exists()


def test_cli_prune_chooses_the_mtp_modules_experts_by_their_own_use(tmp_path, model_dir, capsys):
    import json
    import shutil

    from dsmoe.cli import main

    base = load_pretrained(model_dir)
    with_mtp = build_model(base.config.replace(num_nextn_predict_layers=1)).eval()
    with_mtp.load_state_dict(base.state_dict(), strict=False)
    src = tmp_path / "mtp"
    save_pretrained(with_mtp, src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, src / name)
    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "pruned"
    assert main(["experts", "prune", str(src), "--data", str(calib), "--keep", "4", "--seq-len", "64",
                 "--out", str(out)]) == 0
    tokens = json.loads((out / "surgery.json").read_text())["expert_tokens"]
    assert len(tokens) == len(with_mtp.moe_layers()) and sum(tokens[-1]) == sum(tokens[0]) > 0  # MTP's layer ran
