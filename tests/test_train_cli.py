"""`dsmoe train` and `dsmoe eval` from the command line: a short run end to end, and every bad input stopping at
once with one sentence (exit status 2, no traceback, no run folder left behind)."""

import json
import math

import pytest

from shared_data import SHAKESPEARE
from dsmoe.cli import main

MICRO = ["--model", "hidden_size=64", "intermediate_size=96", "moe_intermediate_size=32", "num_hidden_layers=2",
         "num_attention_heads=2", "n_routed_experts=4", "num_experts_per_tok=2", "n_group=2", "topk_group=1",
         "kv_lora_rank=16", "qk_nope_head_dim=16", "qk_rope_head_dim=8", "v_head_dim=16",
         "--corpus-limit-mb", "0.03", "--vocab-size", "280", "--seq-len", "32", "--micro-batch", "4",
         "--eval-tokens", "256", "--no-progress"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def short_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", SHAKESPEARE, "--steps", "4", "--out", str(run), *MICRO]) == 0
    return run, capsys.readouterr().out


def test_train_then_eval_from_the_command_line(short_run, capsys):
    run, out = short_run
    assert "done:" in out and "final val loss" in out
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    assert main(["eval", str(run)]) == 0
    assert f"validation split: loss {final['val_loss']:.4f}" in capsys.readouterr().out  # the same windows
    assert main(["eval", str(run / "checkpoints" / "step_4"), "--data", SHAKESPEARE, "--max-tokens", "300"]) == 0
    assert "tinyshakespeare.txt: loss" in capsys.readouterr().out


def test_config_file_reruns_a_run_with_overrides(short_run, tmp_path):
    import argparse

    from dsmoe.train.cli import add_arguments, resolve_config

    run, _ = short_run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(run / "train_config.json"), "--out", str(tmp_path / "again"),
                              "--steps", "9", "--model", "num_hidden_layers=3"])
    cfg, out, resume = resolve_config(args)
    assert (cfg.steps, cfg.model["num_hidden_layers"], cfg.model["hidden_size"]) == (9, 3, 64)
    assert cfg.data == [SHAKESPEARE] and out == tmp_path / "again" and not resume


def test_repeated_list_and_mapping_flags_add_up(tmp_path):
    import argparse

    from dsmoe.train.cli import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "a.txt", "b.txt", "--data", "c.txt", "--model", "hidden_size=32",
                              "--model", "num_hidden_layers=3", "--out", str(tmp_path / "r")])
    cfg, _, _ = resolve_config(args)
    assert cfg.data == ["a.txt", "b.txt", "c.txt"]
    assert (cfg.model["hidden_size"], cfg.model["num_hidden_layers"]) == (32, 3)
    from dsmoe.finetune.cli import add_arguments as finetune_arguments

    parser = argparse.ArgumentParser()
    finetune_arguments(parser)
    args = parser.parse_args(["base", "--freeze", "router", "--freeze", "experts", "--lora-targets", "attention",
                              "--lora-targets", "experts"])
    assert (args.freeze, args.lora_targets) == (["router", "experts"], ["attention", "experts"])


def fails(capsys, argv, message):
    brief = argv[0] == "train" and "--resume" not in argv
    assert main([*argv, "--steps", "1"] if brief else argv) == 2  # had it started, it would have been brief
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    return err


def test_bad_inputs_stop_at_once_with_one_sentence(tmp_path, capsys):
    out = str(tmp_path / "new")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    fails(capsys, ["train", "--data", str(tmp_path / "missing.txt"), "--out", out], "no such file")
    fails(capsys, ["train", "--data", str(blank), "--out", out], "holds no text")
    fails(capsys, ["train", "--seq-len", "4096", "--out", out], "max_position_embeddings")
    fails(capsys, ["train", "--data", SHAKESPEARE, "--out", str(afile / "run"), *MICRO], "cannot write to")
    fails(capsys, ["train", "--resume", str(tmp_path / "nothing")], "no training config")
    fails(capsys, ["train", "--preset", "huge", "--out", out], "unknown preset")
    fails(capsys, ["train", "--model", "hidden=3", "--out", out], "not a ModelConfig field")
    fails(capsys, ["train", "--steps", "5", "--tokens", "100", "--out", out], "give one budget")
    fails(capsys, ["train", "--data", SHAKESPEARE, "--out", out, *MICRO, "--vocab-size", "100"], "at least 258")
    fails(capsys, ["train", "--data", SHAKESPEARE, "--out", out, *MICRO, "--tokenizer", str(tmp_path / "tok.json")],
          "no tokenizer.json")  # before the run folder: fixing the path must not meet "already holds a run"
    assert not (tmp_path / "new").exists()  # nothing was created by a refused run
    fails(capsys, ["eval", str(tmp_path)], "no config.json")


def test_an_existing_run_is_neither_overwritten_nor_resumed_with_another_config(short_run, capsys):
    run, _ = short_run
    fails(capsys, ["train", "--data", SHAKESPEARE, "--out", str(run), *MICRO], "--resume")
    fails(capsys, ["train", "--resume", str(run), "--lr", "0.5"], "was trained with --lr")
    fails(capsys, ["train", "--resume", str(run), "--out", str(run.parent / "elsewhere")], "drop --out")
    def validated_steps():
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if "val_loss" in r]

    before = validated_steps()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # same config: allowed (already complete)
    assert validated_steps() == before  # the last step's validation is not logged twice
    assert "final val loss" in capsys.readouterr().out  # and the summary still reports it
    assert main(["train", "--data", SHAKESPEARE, "--out", str(run), "--steps", "2", "--overwrite", *MICRO]) == 0
    assert json.loads((run / "train_config.json").read_text())["steps"] == 2


NUMERIC_FLAGS = [("--lr", "nan", "must be a finite number"), ("--lr", "inf", "must be a finite number"),
                 ("--lr", "0", "must be > 0"), ("--beta1", "1.5", "must be in [0, 1)"),
                 ("--beta2", "-0.1", "must be in [0, 1)"), ("--grad-clip", "nan", "must be a finite number"),
                 ("--grad-clip", "-1", "must be >= 0"), ("--dropout", "1", "must be in [0, 1)"),
                 ("--min-lr-ratio", "2", "must be in [0, 1]"), ("--weight-decay", "1e6", "below 1 / lr"),
                 ("--bias-update-gamma", "inf", "must be a finite number"), ("--seed", "-3", "must be in [0, "),
                 ("--aux-loss-alpha", "nan", "must be a finite number"), ("--warmup-steps", "-1", "must be >= 0"),
                 ("--val-fraction", "1", "must be in [0, 1)"), ("--corpus-limit-mb", "0", "must be > 0")]


@pytest.mark.parametrize("flag,value,message", NUMERIC_FLAGS)
def test_numeric_training_settings_that_cannot_work_are_refused(flag, value, message, tmp_path, capsys):
    err = fails(capsys, ["train", flag, value, "--out", str(tmp_path / "run")], message)
    assert err.startswith(f"error: {flag} ")
    assert not (tmp_path / "run").exists()


def test_every_numeric_training_field_has_a_range():
    import dataclasses
    import math
    import typing

    from dsmoe.errors import UserError
    from dsmoe.train.config import RANGES, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    numeric = {f.name for f in dataclasses.fields(TrainConfig)
               if {int, float} & set(typing.get_args(hints[f.name]) or [hints[f.name]])}
    assert numeric == set(RANGES)
    for name in numeric:
        low = float(RANGES[name][1:-1].split(", ")[0])
        bad = math.nan if float in (typing.get_args(hints[name]) or [hints[name]]) else int(low) - 1
        with pytest.raises(UserError, match="--" + name.replace("_", "-")):
            TrainConfig(**{name: bad})


def test_eval_reports_a_non_finite_loss_as_an_error(short_run, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    run, _ = short_run
    diverged = tmp_path / "diverged"
    shutil.copytree(run, diverged)
    weights = load_file(diverged / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], math.nan)  # what --lr inf left
    save_file(weights, diverged / "model.safetensors")
    fails(capsys, ["eval", str(diverged), "--data", SHAKESPEARE, "--max-tokens", "100"], "NaN or inf")


def test_resume_takes_a_save_killed_before_its_rename_and_a_stop_always_saves(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--data", SHAKESPEARE, "--steps", "4", "--out", str(run), *MICRO]
    assert main([*base, "--checkpoint-interval", "0", "--stop-after", "2"]) == 0  # never every N, but on a stop
    complete = run / "checkpoints" / "step_2"
    assert complete.is_dir()
    complete.rename(run / "checkpoints" / ".step_2.tmp-999999")  # killed between state.json and the rename
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--stop-after", "1", "--no-progress"]) == 0
    assert "stopped at step 3" in capsys.readouterr().out and complete.is_dir()


def test_a_run_refused_for_too_little_text_leaves_nothing_that_blocks_the_retry(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("a few words of text, " * 12)
    argv = ["train", "--data", str(small), "--steps", "1", "--out", str(tmp_path / "run"), *MICRO]
    fails(capsys, [*argv, "--seq-len", "512"], "the training split has")
    assert main([*argv, "--seq-len", "8"]) == 0  # not "already holds a run"
