"""dsmoe analyze: the statistics against direct computations on a tiny model, the probes against `dsmoe eval`."""

import json
import re

import numpy as np
import pytest
import torch

from dsmoe.analysis.analyze import analyze, domain_windows
from dsmoe.analysis.collect import collect_routing
from dsmoe.analysis.probes import experts_disabled, shared_experts_removed
from dsmoe.analysis.report import coactivation_lift, mutual_information_bits, top_coactivated_pairs
from dsmoe.checkpoint.hf import save_pretrained
from dsmoe.cli import main
from dsmoe.presets import get_preset
from dsmoe.data.tokenizer import train_tokenizer
from dsmoe.errors import UserError
from dsmoe.model.transformer import build_model
from dsmoe.tasks.perplexity import evaluate_loss

CPU = torch.device("cpu")
PROSE = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 60
CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n" * 60


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random MoE model (group-limited sigmoid routing, 1 shared expert) with its tokenizer, two domains."""
    root = tmp_path_factory.mktemp("analysis")
    (root / "prose.txt").write_text(PROSE)
    (root / "code.txt").write_text(CODE)
    tok = train_tokenizer([PROSE, CODE], 300)
    config = get_preset("tiny").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, hidden_size=32,
        intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, initializer_range=0.1)
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_pretrained(model, root / "model")
    tok.save(root / "model")
    files = [str(root / "prose.txt"), str(root / "code.txt")]
    return model, tok, files, root


def test_counts_equal_routing_stats_and_the_tables_agree(tiny):
    model, tok, files, _ = tiny
    windows = domain_windows(files, tok, "text", 32, 512)
    totals = collect_routing(model, windows, batch_size=4, device=CPU)
    direct = torch.zeros_like(torch.from_numpy(totals.counts_LE))
    for ws in windows:
        for start in range(0, len(ws), 4):
            model(torch.from_numpy(np.stack(ws[start:start + 4])[:, :-1]))
            direct += model.routing_stats()[0]
    assert np.array_equal(totals.counts_LE, direct.numpy())
    K = model.config.num_experts_per_tok
    assert totals.tokens * K == totals.counts_LE[0].sum()
    assert np.array_equal(totals.domain_counts_LDE.sum(axis=1), totals.counts_LE)
    for l in range(len(totals.counts_LE)):
        C = totals.coactivation_LEE[l]
        assert np.array_equal(np.diag(C), totals.counts_LE[l]) and np.array_equal(C, C.T)
        assert C.sum() == totals.tokens * K * K  # each token adds K x K pairs
    assert np.array_equal(totals.token_expert_LEV.sum(dim=2).numpy(), totals.counts_LE)
    ids = np.concatenate([w[:-1] for ws in windows for w in ws])
    assert np.array_equal(totals.token_expert_LEV[0].sum(dim=0).numpy(), np.bincount(ids, minlength=300) * K)
    assert totals.domain_loss[0] == evaluate_loss(model, windows[0], batch_size=4, device=CPU)[0]


@torch.no_grad()
def test_routed_and_shared_output_norms_against_a_direct_computation(tiny):
    """The experts module adds the shared experts' output to the routed one: the collector must split them."""
    model, tok, files, _ = tiny
    windows = domain_windows(files, tok, "text", 32, 256)
    totals = collect_routing(model, windows, batch_size=4, device=CPU)
    moes = model.moe_layers()
    routed, shared, inputs = np.zeros(len(moes)), np.zeros(len(moes)), {}
    hooks = [moe.register_forward_pre_hook(lambda m, args, l=l: inputs.__setitem__(l, args[0]))
             for l, moe in enumerate(moes)]
    try:
        for ws in windows:
            for start in range(0, len(ws), 4):
                model(torch.from_numpy(np.stack(ws[start:start + 4])[:, :-1]))
                for l, moe in enumerate(moes):
                    x = inputs[l].reshape(-1, inputs[l].shape[-1])
                    r = moe.gate(x, "reference")
                    routed[l] += moe.experts(x, r.topk_idx_TK, r.topk_weight_TK, "reference").norm(dim=-1).sum()
                    shared[l] += moe.shared_experts(x).norm(dim=-1).sum()
    finally:
        for hook in hooks:
            hook.remove()
    np.testing.assert_allclose(totals.routed_norm_L, routed, rtol=1e-5)
    np.testing.assert_allclose(totals.shared_norm_L, shared, rtol=1e-5)


def test_information_measures_against_hand_computations():
    assert mutual_information_bits(np.array([[5, 0], [0, 5]])) == pytest.approx(1.0)  # expert = domain
    assert mutual_information_bits(np.array([[3, 6], [1, 2]])) == pytest.approx(0.0, abs=1e-12)  # independent
    joint = np.array([[4, 1], [2, 3]]) / 10
    px, py = joint.sum(1), joint.sum(0)
    expected = sum(joint[i, j] * np.log2(joint[i, j] / (px[i] * py[j])) for i in range(2) for j in range(2))
    assert mutual_information_bits(joint * 10) == pytest.approx(expected)
    C = np.array([[4, 2], [2, 5]], dtype=float)  # 10 tokens: P(0)=.4, P(1)=.5, P(0 and 1)=.2 -> lift 1
    assert coactivation_lift(C, 10)[0, 1] == pytest.approx(1.0) and np.isnan(coactivation_lift(C, 10)[0, 0])


def test_disabling_nothing_reproduces_the_model_and_disabled_experts_get_no_tokens(tiny):
    model, tok, files, _ = tiny
    windows = domain_windows(files[:1], tok, "text", 32, 256)
    L, E = len(model.moe_layers()), model.config.n_routed_experts
    base = evaluate_loss(model, windows[0], batch_size=4, device=CPU)[0]
    with experts_disabled(model, torch.zeros(L, E, dtype=torch.bool)):
        assert evaluate_loss(model, windows[0], batch_size=4, device=CPU)[0] == pytest.approx(base, abs=1e-6)
    mask = torch.zeros(L, E, dtype=torch.bool)
    mask[:, [0, 5, 6]] = True
    with experts_disabled(model, mask):
        totals = collect_routing(model, windows, batch_size=4, device=CPU)
        assert evaluate_loss(model, windows[0], batch_size=4, device=CPU)[0] != base
    assert (totals.counts_LE[:, [0, 5, 6]] == 0).all() and (totals.counts_LE.sum(axis=1) == totals.tokens * 4).all()
    with shared_experts_removed(model):
        assert evaluate_loss(model, windows[0], batch_size=4, device=CPU)[0] != base
    assert evaluate_loss(model, windows[0], batch_size=4, device=CPU)[0] == base  # every hook removed


def test_analyze_cli_loss_equals_dsmoe_eval_and_writes_the_report(tiny, capsys):
    _, _, files, root = tiny
    out = root / "report"
    assert main(["analyze", str(root / "model"), "--data", *files, "--tokens", "512", "--seq-len", "32",
                 "--batch-size", "4", "--disable", "1", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("report.md", "load.png", "domains.png", "coactivation.png"):
        assert (out / name).stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", str(root / "model"), "--data", files[0], "--seq-len", "32", "--max-tokens", "256",
                 "--batch-size", "4"]) == 0
    printed = float(re.search(r"loss (\d+\.\d+)", capsys.readouterr().out).group(1))
    assert report["domains"][0]["loss"] == pytest.approx(printed, abs=5e-5) and report["domains"][0]["tokens"] == 256
    assert [r["disabled"] for r in report["redundancy"]] == [1, 2]
    assert report["shared_ablation"]["rise"] != 0 and len(report["layers"]) == 2
    assert 0 <= report["summary"]["specialisation_mean"] <= 1
    assert 0 < report["layers"][0]["shared_norm_share"] < 1


def test_analyze_rejects_impossible_probes(tiny):
    model, tok, files, _ = tiny
    with pytest.raises(UserError, match="--disable 13"):
        analyze(model, tok, files, disable=[13], device=CPU)


def test_the_mtp_modules_layers_are_left_out_of_the_analysis(tiny):
    """Evaluation never runs the MTP modules: their layers would show as all-zero rows and dilute the means."""
    model, tok, files, _ = tiny
    with_mtp = build_model(model.config.replace(num_nextn_predict_layers=1)).eval()
    with_mtp.load_state_dict(model.state_dict(), strict=False)
    ours, _ = analyze(model, tok, files, tokens=256, seq_len=32, disable=[], device=CPU)
    theirs, arrays = analyze(with_mtp, tok, files, tokens=256, seq_len=32, disable=[], device=CPU)
    assert [l["layer"] for l in theirs["layers"]] == [l["layer"] for l in ours["layers"]] == [1, 2]
    assert theirs["summary"] == ours["summary"] and arrays["counts_LE"].shape[0] == 2


def test_top_coactivated_pairs_ignore_pairs_seen_by_a_few_tokens():
    """Two experts chosen once each, by the same token, have the largest lift possible (T): noise, not a pair."""
    co = np.zeros((4, 4))
    co[0, 0] = co[1, 1] = 300
    co[0, 1] = co[1, 0] = 120  # often together: lift 1000 * 120 / (300 * 300) = 1.33
    co[2, 2] = co[3, 3] = co[2, 3] = co[3, 2] = 1  # one token: lift 1000
    assert top_coactivated_pairs(co, 1000) == [{"experts": [0, 1], "lift": pytest.approx(1000 * 120 / 300**2),
                                                "tokens": 120}]
