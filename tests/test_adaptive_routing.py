"""Adaptive (top-p) routing: the rule against a per-token loop, tokens at k_min and k_max, every expert path
and gradient against the reference, balance losses that count only the used slots, the expert-count
regulariser, the config round trip that transformers refuses, and KV-cached generation."""

import pytest
import torch

from dsmoe.config import ModelConfig
from dsmoe.kernels import ops
from dsmoe.model.balance import expert_balance_loss, expert_count_loss
from dsmoe.model.moe import MoE
from dsmoe.model.router import route
from dsmoe.model.transformer import build_model

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128, n_routed_experts=8,
            num_experts_per_tok=4, n_shared_experts=1, routing_top_p=0.5, routing_min_k=1)


def loop_rule(scores, bias, top_p, min_k, k_max, norm):
    """The rule written out per token: experts by biased choice, keep while the mass before is < top_p."""
    out = []
    for s, c in zip(scores, scores + (0 if bias is None else bias)):
        order = sorted(range(len(s)), key=lambda e: -float(c[e]))[:k_max]
        total, mass, used = float(s.sum()), 0.0, []
        for j, e in enumerate(order):
            if j >= min_k and mass >= top_p:
                break
            used.append(e)
            mass += float(s[e]) / total
        w = {e: float(s[e]) for e in used}
        z = sum(w.values()) if norm else 1.0
        out.append({e: v / z for e, v in w.items()})
    return out


@pytest.mark.parametrize("scoring,norm,bias", [("softmax", False, False), ("sigmoid", True, True)])
def test_top_p_rule_equals_a_per_token_loop(scoring, norm, bias):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g) * 2
    b = torch.randn(8, generator=g) * 0.1 if bias else None
    r = route(logits, top_k=4, scoring_func=scoring, topk_method="greedy", norm_topk_prob=norm, bias_E=b,
              top_p=0.6, min_k=1)
    want = loop_rule(r.scores_TE, b, 0.6, 1, 4, norm)
    for t in range(64):
        got = {int(e): float(w) for e, w, a in zip(r.topk_idx_TK[t], r.topk_weight_TK[t], r.active_TK[t]) if a}
        assert got.keys() == want[t].keys()
        assert all(abs(got[e] - want[t][e]) < 1e-6 for e in got)
        assert float(r.topk_weight_TK[t][r.active_TK[t] == 0].abs().sum()) == 0
    assert torch.equal(r.counts_E, torch.bincount(r.topk_idx_TK[r.active_TK.bool()], minlength=8))
    k = r.active_TK.sum(1)
    assert k.min() >= 1 and k.max() <= 4


def test_tokens_at_k_min_and_k_max():
    logits = torch.tensor([[20.0, 0, 0, 0, 0, 0, 0, 0], [0.0] * 8])  # one decisive token, one undecided
    r = route(logits, top_k=4, scoring_func="softmax", topk_method="greedy", top_p=0.9, min_k=2)
    assert r.active_TK.sum(1).tolist() == [2, 4]


def layer_and_input(impl, dtype=torch.float32):
    torch.manual_seed(0)
    config = ModelConfig(**BASE)
    moe = MoE(config, impl)
    moe.reset_parameters(0.2)
    with torch.no_grad():  # leave expert 7 without tokens: its selection bias is far below the others
        moe.gate.e_score_correction_bias[7] = -10.0
    return moe.to(dtype), torch.randn(1, 13, 64, dtype=dtype)


@pytest.mark.parametrize("impl,dtype", [("grouped", torch.float32), ("grouped", torch.bfloat16),
                                        ("triton", torch.float32)])
def test_adaptive_experts_and_every_gradient_equal_the_reference(impl, dtype):
    if impl == "triton" and not ops.triton_available(torch.device("cuda")) and \
            __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or the interpreter")
    ref, x = layer_and_input("reference", dtype)
    fast, _ = layer_and_input(impl, dtype)
    if impl == "triton" and not torch.cuda.is_available():
        fast.impl = "triton"  # force the kernels through the interpreter
        pytest.importorskip("triton")
        from dsmoe.kernels import triton_moe  # noqa: F401
    outs = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.ones_like(y) * 0.1)
        outs.append((y, xi.grad, *[p.grad for p in layer.parameters()]))
    for a, b in zip(*outs):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol)
    assert int(ref.expert_counts[7]) == 0


def test_balance_loss_counts_only_used_slots():
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2]])
    active = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0]])
    # used decisions: expert 0 x3, 1 x2, 2 x0 (inactive), 3 x0 -> 5 in all; f = 4 * c / 5; P = 1/4 each
    expected = 1.0 * sum(4 * c / 5 * 0.25 for c in (3, 2, 0, 0))
    assert abs(float(expert_balance_loss(probs, idx, 1.0, None, active)) - expected) < 1e-6


def test_count_regulariser_pulls_towards_the_target():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(32, 8, generator=g) * 0.1).requires_grad_()  # flat: every token near k_max
    r = route(logits, top_k=4, scoring_func="softmax", topk_method="greedy", top_p=0.5)
    loss = expert_count_loss(r.scores_TE, r.topk_idx_TK, 0.5, 1, target=1.5, alpha=1.0)
    loss.backward()
    stepped = logits - 10.0 * logits.grad
    r2 = route(stepped, top_k=4, scoring_func="softmax", topk_method="greedy", top_p=0.5)
    assert float(loss.detach()) > 0 and r2.active_TK.sum(1).float().mean() < r.active_TK.sum(1).float().mean()


def test_config_round_trips_and_transformers_refuses_it(tmp_path):
    from dsmoe import load_pretrained, save_pretrained

    config = ModelConfig(**BASE, routing_target_k=2.0, routing_k_loss_alpha=0.01)
    hf = config.to_hf_dict()
    assert hf["model_type"].endswith("_dsmoe_adaptive") and "transformers" in hf["dsmoe_note"]
    assert ModelConfig.from_hf_dict(hf) == config
    assert "routing_top_p" not in ModelConfig(**{**BASE, "routing_top_p": None}).to_hf_dict()
    model = build_model(config).eval()
    save_pretrained(model, tmp_path)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path).eval()(ids), model(ids))
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="dsmoe_adaptive"):
        transformers.AutoConfig.from_pretrained(tmp_path)


def test_cached_generation_equals_full_forwards():
    from dsmoe.infer.generate import generate
    from dsmoe.infer.sampling import SamplingParams

    torch.manual_seed(0)
    model = build_model(ModelConfig(**BASE), dtype=torch.float32).eval()
    prompt = [5, 17, 3, 44]
    out = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_analyze_reports_experts_per_token_and_the_tokens_taking_most(tmp_path):
    from dsmoe.analysis.collect import collect_routing
    from dsmoe.analysis.report import experts_per_token
    from dsmoe.data.tokenizer import train_tokenizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(**BASE), dtype=torch.float32).eval()
    with torch.no_grad():  # decisive routers, so tokens differ in how many experts reach top_p
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0, 1.0)
    windows = [torch.randint(0, 97, (17,)).numpy() for _ in range(6)]
    totals = collect_routing(model, [windows], batch_size=3, device=torch.device("cpu"))
    hist = totals.experts_per_token_LK[0]
    assert hist.sum() == 6 * 16 and hist[0] == 0 and hist[5:].sum() == 0 and (hist > 0).sum() > 1  # 1 <= k <= 4
    mean = (hist * torch.arange(5).numpy()).sum() / hist.sum()
    assert abs(mean - totals.counts_LE[0].sum() / (6 * 16)) < 1e-9  # the counts count used slots only
    tokenizer = train_tokenizer(["abc def ghi " * 50], 300)
    out = experts_per_token(totals, 0, tokenizer, top=3, min_count=1)
    assert abs(out["experts_per_token_mean"] - mean) < 1e-9 and len(out["tokens_taking_most_experts"]) == 3
    takes = [t["experts"] for t in out["tokens_taking_most_experts"]]
    assert takes == sorted(takes, reverse=True) and takes[0] <= 4


def test_training_metric_experts_per_token_counts_real_tokens_of_the_main_layers():
    """Model.routed_load() (the trainer's metric: used decisions / real tokens) recomputed from each layer's own
    routing; padding and the MTP module's layer are left out."""
    torch.manual_seed(0)
    config = ModelConfig(**{**BASE, "num_hidden_layers": 3, "num_nextn_predict_layers": 1})
    model = build_model(config, dtype=torch.float32)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0, 1.0)
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.arange(11)[None] < torch.tensor([[11], [7], [4]])  # right-padded rows
    seen = {}
    hooks = [m.gate.register_forward_hook(lambda mod, args, out, i=i: seen.setdefault(i, out))
             for i, m in enumerate(model.moe_layers())]
    model(ids, token_mask=mask, with_mtp=True)
    for h in hooks:
        h.remove()
    main = [i for i, layer in enumerate(config.moe_layer_ids) if layer < config.num_hidden_layers]
    assert len(main) == 2 and len(seen) == 3
    expected = sum(float(seen[i].active_TK[mask.flatten()].sum()) / int(mask.sum()) for i in main) / len(main)
    used, tokens = model.routed_load()
    assert int(tokens) == int(mask.sum()) and abs(float(used / tokens) - expected) < 1e-6
    assert 1 < expected < config.num_experts_per_tok  # adaptive: neither k_min nor k_max for every token


def test_count_regulariser_leaves_padding_out():
    g = torch.Generator().manual_seed(1)
    r = route(torch.randn(6, 8, generator=g), top_k=4, scoring_func="softmax", topk_method="greedy", top_p=0.5)
    real = torch.tensor([True, True, True, True, False, False])
    masked = expert_count_loss(r.scores_TE, r.topk_idx_TK, 0.5, 1, 2.0, 1.0, r.active_TK & real[:, None])
    alone = expert_count_loss(r.scores_TE[:4], r.topk_idx_TK[:4], 0.5, 1, 2.0, 1.0)
    everything = expert_count_loss(r.scores_TE, r.topk_idx_TK, 0.5, 1, 2.0, 1.0)
    assert torch.allclose(masked, alone) and not torch.allclose(masked, everything)


def test_training_logs_experts_per_token(tmp_path):
    from dsmoe.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--model", "routing_top_p=0.25", "routing_min_k=1",
                 "num_experts_per_tok=8", "routing_target_k=4", "routing_k_loss_alpha=0.01", "--steps", "2",
                 "--grad-accum", "2", "--micro-batch", "2", "--seq-len", "64", "--log-interval", "1",
                 "--checkpoint-interval", "0", "--eval-tokens", "512", "--no-progress", "--out", str(out)]) == 0
    import json
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    used = [r["experts_per_token"] for r in rows if "experts_per_token" in r]
    assert len(used) == 2 and all(1 <= k <= 8 for k in used) and not any("routed_tokens" in r for r in rows)


def test_a_fresh_top_p_router_far_from_its_target_is_pointed_out(tmp_path, capsys):
    from dsmoe.cli import main
    from dsmoe.model.router import uniform_top_p_count

    assert uniform_top_p_count(0.5, 31, 1, 14) == 14 and uniform_top_p_count(7 / 31, 31, 1, 14) == 7
    flags = ["--preset", "tiny", "--steps", "1", "--micro-batch", "2", "--seq-len", "64", "--checkpoint-interval",
             "0", "--eval-tokens", "256", "--no-progress"]
    model = ["--model", "routing_min_k=1", "num_experts_per_tok=8", "routing_target_k=4", "routing_k_loss_alpha=0.01"]
    assert main(["train", *flags, *model, "routing_top_p=0.9", "--out", str(tmp_path / "a")]) == 0
    assert "note: at routing_top_p 0.9 a fresh router gives every token about 8 experts" in capsys.readouterr().out
    assert main(["train", *flags, *model, "routing_top_p=0.25", "--out", str(tmp_path / "b")]) == 0
    assert "note:" not in capsys.readouterr().out
