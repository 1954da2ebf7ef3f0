"""dsmoe experiment: arms at equal active parameters, paired initialisation, and a tiny run of the CPU scale whose
rows rerun alone with `dsmoe train --config`."""

import json

import pytest
import torch

from dsmoe.analysis.experiments import EXPERIMENTS, SCALE, experiment_rows
from dsmoe.cli import main
from dsmoe.errors import UserError
from dsmoe.model.router import route, route_options
from dsmoe.train.config import TrainConfig
from dsmoe.train.model_setup import build_training_model
from dsmoe.train.reduce import SingleProcess

TEXT = ("In the beginning the experts were few and coarse; later they were many and fine. " * 40 +
        "def route(tokens):\n    return sorted(tokens, key=score)[:k]\n" * 40)


def _model_config(cfg: TrainConfig):
    return cfg.model_config(1024, 0, 1)


@pytest.mark.parametrize("scale", list(SCALE))
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_arms_have_equal_active_parameters(name, scale):
    rows = experiment_rows(name, scale, data=[], seeds=[0])
    configs = {r.arm: _model_config(r.config) for r in rows}
    if name == "adaptive-routing":  # top-p's config holds k_max; its regulariser targets top-k's k on average
        fixed, adaptive = configs["top-k"], configs["top-p"]
        assert adaptive.routing_target_k == fixed.num_experts_per_tok < adaptive.num_experts_per_tok
        # a fresh router (small random logits) starts near the target, not at k_max
        torch.manual_seed(0)
        logits = torch.randn(4096, 64) @ torch.randn(adaptive.n_routed_experts, 64).t() * 0.02
        used = route(logits, **route_options(adaptive), top_p=adaptive.routing_top_p,
                     min_k=adaptive.routing_min_k).active_TK.sum(-1).float().mean().item()
        assert adaptive.routing_target_k - 1.5 <= used <= adaptive.routing_target_k, used
        configs = {"top-k": fixed, "top-p": adaptive.replace(num_experts_per_tok=fixed.num_experts_per_tok)}
    ffn_active = {arm: c.num_params(active=True) - (c.n_routed_experts or 0) * c.hidden_size * c.num_hidden_layers
                  for arm, c in configs.items()}  # the routers' weights aside
    assert len(set(ffn_active.values())) == 1, ffn_active
    moe = [c for c in configs.values() if c.n_routed_experts]
    expert_params = {(c.n_routed_experts + c.n_shared_experts) * c.moe_intermediate_size for c in moe}
    assert len(expert_params) == 1  # the same expert parameters, split differently
    assert len({r.config.seed for r in rows}) == 1 and all(r.config.paired_init for r in rows)


def test_rows_are_ordinary_train_configs_and_bad_choices_are_named():
    rows = experiment_rows("balancing", "cpu", data=["x.txt"], seeds=[3, 4], only=["aux-free"])
    assert [r.name for r in rows] == ["aux-free-seed3", "aux-free-seed4"]
    assert TrainConfig.from_dict(rows[0].config.to_dict()) == rows[0].config
    assert rows[0].config.aux_loss_alpha == 0 and rows[0].config.bias_update_gamma > 0
    with pytest.raises(UserError, match="has the arms"):
        experiment_rows("balancing", "cpu", data=[], seeds=[0], only=["gshard"])
    with pytest.raises(UserError, match="--scale"):
        experiment_rows("balancing", "tpu", data=[], seeds=[0])


def test_paired_init_shares_every_weight_outside_the_ffns():
    dense, moe = (r.config for r in experiment_rows("architectures", "cpu", data=[], seeds=[0], only=["dense",
                                                                                                    "deepseekmoe"]))
    build = lambda cfg: dict(build_training_model(_model_config(cfg), cfg, torch.device("cpu"), SingleProcess(),
                                                  1).named_parameters())
    a, b = build(dense), build(moe)
    shared = [n for n in a if n in b and ".mlp." not in n and a[n].dim() >= 2]
    assert shared and all(torch.equal(a[n], b[n]) for n in shared)
    other_seed = build(TrainConfig.from_dict({**moe.to_dict(), "seed": 1}))
    assert not torch.equal(other_seed["embed_tokens.weight"], b["embed_tokens.weight"])
    assert b["embed_tokens.weight"].std().item() == pytest.approx(_model_config(moe).initializer_range, rel=0.05)


def test_a_missing_analysis_file_stops_the_experiment_before_any_training(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT)
    out = tmp_path / "exp"
    assert main(["experiment", "architectures", "--scale", "cpu", "--data", str(tmp_path / "corpus.txt"),
                 "--steps", "2", "--arms", "deepseekmoe", "--seeds", "0", "--out", str(out),
                 "--analyze", str(tmp_path / "nope.txt")]) != 0
    assert "nope.txt" in capsys.readouterr().err and not (out / "runs").exists()


def test_cpu_experiment_end_to_end_and_a_row_reruns_alone(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT)
    out, cache = tmp_path / "exp", str(tmp_path / "cache")
    args = ["experiment", "architectures", "--scale", "cpu", "--data", str(tmp_path / "corpus.txt"), "--steps", "3",
            "--arms", "dense", "deepseekmoe", "--seeds", "0", "1", "--out", str(out), "--cache-dir", cache,
            "--parallel", "2"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "loss.png").stat().st_size > 0 and "| deepseekmoe |" in (out / "table.md").read_text()
    assert "while 2 ran at once" in (out / "table.md").read_text()
    arms = results["arms"]
    assert set(arms) == {"dense", "deepseekmoe"} and arms["deepseekmoe"]["seeds"] == [0, 1]
    losses = {(r["arm"], r["seed"]): r["val_loss"] for r in results["rows"]}
    diffs = [losses["deepseekmoe", s] - losses["dense", s] for s in (0, 1)]
    assert arms["deepseekmoe"]["paired_diff_mean"] == pytest.approx(sum(diffs) / 2)
    assert arms["dense"]["maxvio_end"] is None and arms["deepseekmoe"]["maxvio_end"] >= 0
    assert arms["dense"]["experts_per_token_end"] is None and arms["deepseekmoe"]["experts_per_token_end"] == 7
    assert "experts per token" not in (out / "table.md").read_text()  # a column for adaptive routing only
    assert results["tokens_per_run"] == 3 * 8 * 64 and results["epochs"] > 0
    commands = (out / "commands.sh").read_text().splitlines()[1:]
    assert len(commands) == 4 and all(c.startswith("dsmoe train --config ") for c in commands)
    rerun = tmp_path / "rerun"
    assert main(["train", "--config", str(out / "configs" / "deepseekmoe-seed1.json"), "--out", str(rerun),
                 "--cache-dir", cache, "--no-progress"]) == 0
    again = [json.loads(line) for line in (rerun / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in again if "val_loss" in r][-1] == losses["deepseekmoe", 1]
    capsys.readouterr()
    assert main(args) == 0 and "trained" not in capsys.readouterr().out  # finished rows are not trained again


def test_the_table_shows_experts_per_token_when_an_arm_routes_adaptively():
    from dsmoe.analysis.experiment_report import table

    arm = dict(val_loss_mean=5.0, val_loss_sd=0.1, seeds=[0, 1], paired_diff_mean=None, paired_diff_sd=None,
               maxvio_end=0.3, tokens_per_s=1000.0, params=2e6, active_params=1e6, experts_per_token_end=7.0)
    results = dict(reference_arm="top-k", tokens_per_run=100, epochs=0.1, train_tokens=1000, val_tokens=10,
                   data=["x"], arms={"top-k": arm, "top-p": {**arm, "paired_diff_mean": 0.01, "paired_diff_sd": 0.0,
                                                           "experts_per_token_end": 6.5}},
                   rows=[{"adaptive": False}, {"adaptive": True}])
    text = table(results, "adaptive-routing")
    assert "routed experts per token (end)" in text and "| 6.50 |" in text and "| 7.00 |" in text
    results["arms"]["top-p"]["experts_per_token_end"] = None  # a run from before the metric was logged
    assert "| - |" in table(results, "adaptive-routing")
    results["rows"] = [{"adaptive": False}]
    assert "experts per token" not in table(results, "adaptive-routing")
    assert "| 5.0000 ± 0.1000 (n=2) |" in text and "| +0.0100 ± 0.0000 |" in text
    for one in results["arms"].values():
        one["seeds"] = [0]
    text = table(results, "adaptive-routing")  # one seed: no spread to show
    rows = [line for line in text.splitlines() if line.startswith("| top-")]
    assert len(rows) == 2 and not any("±" in row for row in rows) and "| 5.0000 (n=1) |" in rows[0]
    assert "| +0.0100 |" in rows[1]


def test_longer_runs_read_proportionally_more_text():
    base = experiment_rows("architectures", "gpu", data=[], seeds=[0])[0].config
    longer = experiment_rows("architectures", "gpu", data=[], seeds=[0], steps=4 * SCALE["gpu"].steps)[0].config
    shorter = experiment_rows("architectures", "gpu", data=[], seeds=[0], steps=10)[0].config
    assert longer.corpus_limit_mb == 4 * base.corpus_limit_mb and shorter.corpus_limit_mb == base.corpus_limit_mb
    assert base.eval_interval == SCALE["gpu"].eval_interval and longer.eval_interval == longer.steps // 20
    assert shorter.eval_interval == 10
