"""The trainer: the loss falls, resume is bit-exact, non-finite steps never reach the weights, the run folder
loads in dsmoe and in transformers; schedules and the FLOP count."""

import json
import math

import pytest
import torch

from shared_data import SHAKESPEARE
from dsmoe import load_pretrained
from dsmoe.presets import PRESETS
from dsmoe.errors import UserError
from dsmoe.train.config import TrainConfig
from dsmoe.train.flops import matmul_params_per_token
from dsmoe.train.optim import lr_at
from dsmoe.train.trainer import Trainer, TrainingDiverged

# A few hundred thousand parameters: a step takes milliseconds on the CPU.
MICRO_MODEL = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                   kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def micro_config(**overrides) -> TrainConfig:
    values = dict(model=MICRO_MODEL, data=[SHAKESPEARE], corpus_limit_mb=0.04, vocab_size=300, seq_len=32,
                  micro_batch=4, grad_accum=2, steps=20, lr=3e-3, warmup_steps=4, eval_interval=10,
                  eval_tokens=512, checkpoint_interval=10, log_interval=1)
    return TrainConfig(**{**values, **overrides})


def records(run, key="lm_loss"):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 40-step run shared by the tests that only read its folder."""
    run = tmp_path_factory.mktemp("run") / "run"
    trainer = Trainer(micro_config(steps=30, eval_interval=15, checkpoint_interval=10), run,
                      cache_dir=run.parent / "cache", progress=False)
    return run, trainer.train(), trainer


def test_loss_falls_and_the_run_folder_is_complete(trained_run):
    run, summary, _ = trained_run
    losses = records(run)
    assert max(losses[1], losses[2]) > min(losses[29], losses[30]) + 1.0
    val = records(run, "val_loss")
    assert sorted(val) == [15, 30] and val[30] < val[15]
    assert summary["val_loss"] == val[30] and summary["steps"] == 30
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_config.json",
                 "plots/loss.png", "plots/expert_load.png"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_20", "step_30"]  # keep_checkpoints=2
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "maxvio", "maxvio_mean", "skipped_steps"):
        assert key in record, key
    assert len(record["maxvio"]) == 1 and record["aux_loss"] > 0  # one MoE layer, balance loss on (tiny preset)
    assert TrainConfig.load(run) == micro_config(steps=30, eval_interval=15, checkpoint_interval=10)


def test_run_folder_loads_in_dsmoe_and_transformers(trained_run):
    run, _, trainer = trained_run
    transformers = pytest.importorskip("transformers")
    config = json.loads((run / "config.json").read_text())
    tok_config = json.loads((run / "tokenizer_config.json").read_text())
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert config["bos_token_id"] == specials[tok_config["bos_token"]]
    assert config["eos_token_id"] == specials[tok_config["eos_token"]]
    assert config["vocab_size"] == 300 and config["architectures"] == ["DeepseekV3ForCausalLM"]

    ours = load_pretrained(run).eval()
    for (name, a), b in zip(trainer.model.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name  # the aux-free router biases included
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_resume_is_bit_exact(tmp_path):
    # NOTE: at these sizes every CPU kernel runs serially. Past torch's parallel grain, the grouped experts'
    # gather backward (index_put with accumulate) sums in thread order, so two processes differ in the last bit;
    # the reference experts stay exact at any size.
    cfg = micro_config(steps=20, grad_accum=1, eval_interval=100, checkpoint_interval=100, dropout=0.1)  # RNG too
    straight = tmp_path / "straight"
    Trainer(cfg, straight, cache_dir=tmp_path / "cache", progress=False).train()
    split = tmp_path / "split"
    first = Trainer(cfg, split, cache_dir=tmp_path / "cache", progress=False).train(stop_after=10)
    assert first["steps"] == 10
    with open(split / "metrics.jsonl", "a") as f:  # a record written after the checkpoint, before a crash
        f.write(json.dumps({"step": 13, "lm_loss": -1.0}) + "\n" + '{"step": 14, "lm_lo')  # and one cut short
    resumed = Trainer(cfg, split, resume=True, cache_dir=tmp_path / "cache", progress=False)
    assert resumed.step == 10
    resumed.train()
    for key in ("lm_loss", "grad_norm", "lr", "val_loss"):
        assert records(straight, key) == {s: v for s, v in records(split, key).items() if s in records(straight, key)}
    assert sorted(records(split)) == list(range(1, 21))
    a, b = load_pretrained(straight), load_pretrained(split)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_non_finite_steps_are_skipped_on_the_device_and_never_reach_the_weights(tmp_path):
    trainer = Trainer(micro_config(max_skipped_steps=3), tmp_path / "run", cache_dir=tmp_path / "cache",
                      progress=False)
    model = trainer.model
    poison = {"loss": False, "grad": False}
    model.embed_tokens.register_forward_hook(lambda m, i, out: out * math.nan if poison["loss"] else None)
    model.norm.weight.register_hook(lambda g: g * math.inf if poison["grad"] else g)
    snapshot = lambda: {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = lambda: {k: v.clone() for p in trainer.optimizer.state.values() for k, v in p.items()}

    def step() -> dict:
        trainer.train_step()
        (record,) = trainer.read_steps()
        return record

    assert step()["ok"]
    counts = trainer.load_counts[0].float()  # the step's, all micro-batches
    expected_bias = trainer.cfg.bias_update_gamma * torch.sign(counts.mean() - counts)
    assert torch.equal(model.layers[1].mlp.gate.e_score_correction_bias, expected_bias)  # the aux-free update
    for kind in ("loss", "grad"):
        before, moments = snapshot(), optimizer_state()
        load = trainer.load_counts.clone()
        poison[kind] = True
        result = step()
        poison[kind] = False
        assert not result["ok"]
        after = snapshot()
        assert all(torch.equal(before[k], after[k]) for k in before), kind  # weights and router biases untouched
        assert all(torch.equal(moments[k], v) for k, v in optimizer_state().items()), kind  # moments, step count
        assert torch.equal(load, trainer.load_counts)  # the skipped step's routing is not in the load plot
        assert step()["ok"]  # training continues
    assert trainer.skipped == 2 and trainer.consecutive_skips == 0 and trainer.step == 5

    poison["loss"] = True
    with pytest.raises(TrainingDiverged, match="3 steps in a row") as failure:
        trainer.train()
    assert trainer.step == 8 and trainer.skipped == 5  # log_interval 1: it stops at the third bad step
    assert "--resume" in str(failure.value)  # the message names the way out


def test_abort_waits_for_the_log_interval_and_a_recovered_streak_still_aborts(tmp_path):
    trainer = Trainer(micro_config(max_skipped_steps=2, log_interval=4, grad_accum=1), tmp_path / "run",
                      cache_dir=tmp_path / "cache", progress=False)
    bad = iter([False, True, True, False, False, False, False, False])
    trainer.model.embed_tokens.register_forward_hook(lambda m, i, out: out * math.nan if next(bad) else None)
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row \(up to step 3\)"):
        trainer.train()
    assert trainer.step == 4  # read back at the log interval: step 4 (finite) ran before the abort



def test_the_loss_plot_of_an_evaluation_before_the_first_logged_step_warns_nothing(tmp_path):
    """--eval-interval below --log-interval plots before any record exists: matplotlib warned "No artists with
    labels found to put in legend" into the user's terminal."""
    import warnings

    from dsmoe.train.plots import plot_loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_loss([], tmp_path / "loss.png")
        plot_loss([{"step": 3, "val_loss": 5.0}], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0

@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_schedules(schedule):
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule=schedule, decay_fraction=0.2)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    if schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[80] < 1.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.parametrize("steps,warmup", [(5, 30), (100, 100), (100, 99), (2, 10)])
def test_a_run_no_longer_than_its_warmup_still_ends_at_the_floor(schedule, steps, warmup):
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=warmup, schedule=schedule, decay_fraction=0.2)
    lrs = [lr_at(s, cfg, steps) for s in range(steps)]
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)


def test_matmul_flop_count_matches_the_weights_a_token_uses():
    c = PRESETS["tiny"].replace(vocab_size=500)
    from dsmoe.model.transformer import build_model

    model = build_model(c)
    expected = 0
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight" or p.dim() < 2:
            continue  # a lookup and the norms
        share = c.num_experts_per_tok / c.n_routed_experts if ".experts." in name else 1
        expected += p.numel() * share
    assert matmul_params_per_token(c) == expected


def test_token_budget_time_limit_and_tensorboard(tmp_path):
    assert TrainConfig(tokens=10_000, micro_batch=2, grad_accum=2, seq_len=100).total_steps() == 25
    assert TrainConfig(tokens=10_000, micro_batch=2, grad_accum=2, seq_len=100).total_steps(dp_size=2) == 13
    summary = Trainer(micro_config(steps=50, log_interval=10), tmp_path / "limited", cache_dir=tmp_path / "cache",
                      progress=False).train(time_limit=0)
    assert summary["steps"] == 1 and sorted(records(tmp_path / "limited")) == [1]  # stopped, logged, saved
    assert (tmp_path / "limited" / "checkpoints" / "step_1").is_dir()
    pytest.importorskip("tensorboard")
    Trainer(micro_config(steps=2, tensorboard=True), tmp_path / "run", cache_dir=tmp_path / "cache",
            progress=False).train()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_activation_checkpointing_changes_memory_not_results(tmp_path):
    results, attention_calls = [], []
    for ac in (False, True):
        trainer = Trainer(micro_config(activation_checkpointing=ac, dropout=0.1), tmp_path / f"run{ac}",
                          cache_dir=tmp_path / "cache", progress=False)
        calls = []
        trainer.model.layers[0].self_attn.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        for _ in range(3):
            trainer.train_step()
        results.append([(r["lm_loss"], r["grad_norm"]) for r in trainer.read_steps()])
        attention_calls.append(len(calls))
    assert attention_calls[1] == 2 * attention_calls[0]  # checkpointed: every block ran again in backward
    assert results[0] == results[1]  # and replayed the same dropout masks and routing


def test_moe_impl_choices_follow_the_kernels():
    from dsmoe.kernels.ops import IMPLS
    from dsmoe.train.config import MOE_IMPLS

    assert set(MOE_IMPLS) == set(IMPLS)


def test_bf16_weights_padded_vocabulary_and_no_checkpoints(tmp_path):
    """The memory levers of a model that only just fits (DeepSeek-V2-Lite on one H200): bf16 weights, gradients and
    AdamW moments (router fp32), a vocabulary padded to the preset's, no resumable checkpoints."""
    cfg = micro_config(steps=3, param_dtype="bf16", checkpoint_interval=0, model={**MICRO_MODEL, "vocab_size": 320})
    trainer = Trainer(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    summary = trainer.train()
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0 and math.isfinite(summary["val_loss"])
    dtypes = {name: p.dtype for name, p in trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if not n.endswith("mlp.gate.weight")} == {torch.bfloat16}
    assert dtypes["layers.1.mlp.gate.weight"] == torch.float32
    moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert len(moments) == len(dtypes) and {m.dtype for m in moments} == {torch.bfloat16, torch.float32}
    assert trainer.model.config.vocab_size == 320 and not (tmp_path / "run" / "checkpoints").exists()
    assert load_pretrained(tmp_path / "run").config.vocab_size == 320
    with pytest.raises(UserError, match="below the tokenizer's vocabulary"):
        micro_config(model={**MICRO_MODEL, "vocab_size": 100}).model_config(300, 0, 1)


@pytest.mark.gpu
def test_on_the_gpu_per_block_and_whole_model_compile_train_like_eager(tmp_path):
    """bf16 autocast on CUDA: the three ways `dsmoe bench train` compares give the same steps (to bf16 precision),
    report MFU, and skip a poisoned step on the device; activation checkpointing composes with per-block compile
    (the V2-Lite command) and with bf16 weights."""
    losses = {}  # on the built-in corpus (data=[]): a GPU machine need not hold ../shared/data
    for scope, ac, param_dtype in ((None, False, "fp32"), ("blocks", False, "fp32"), ("model", False, "fp32"),
                                   ("blocks", True, "bf16")):
        cfg = micro_config(steps=3, device="cuda", compile=scope is not None, compile_scope=scope or "blocks",
                           activation_checkpointing=ac, param_dtype=param_dtype, data=[])
        run = tmp_path / f"{scope}-{ac}"
        trainer = Trainer(cfg, run, cache_dir=tmp_path / "cache", progress=False)
        trainer.run(stop_after=2)
        losses[scope, ac] = list(records(run).values())
        assert 0 < trainer.last_record["mfu"] < 1
    for key in (("blocks", False), ("model", False), ("blocks", True)):
        assert losses[key] == pytest.approx(losses[None, False], rel=2e-2), key
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.embed_tokens.register_forward_hook(lambda m, i, out: out * math.nan)
    trainer.train_step()
    assert not trainer.read_steps()[0]["ok"]
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
