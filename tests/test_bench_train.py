"""`dsmoe bench train` end to end on the CPU at toy size: the trainer variants run the Trainer itself (its record
is the row), start from the weights transformers gets, their first-step losses agree with transformers', the
table comes last and the JSON holds every row. (Timings on the CPU mean nothing.)"""

import argparse
import json

import pytest

from dsmoe.bench import train as bench
from dsmoe.train.trainer import Trainer


def test_bench_times_the_trainer_and_checks_against_transformers(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    steps = []
    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: (steps.append(self.step), original(self))[1])
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--micro-batch", "1", "--seq-len", "16",
                              "--steps", "2", "--warmup", "2", "--variants", "trainer", "hf-grouped_mm",
                              "--moe-impl", "grouped", "--set", "bias_update_gamma=0.01", "--json", str(out)])
    assert bench.run(args) == 0
    assert steps == [0, 1, 2, 3]  # warm-up and timed steps all went through Trainer.train_step
    text = capsys.readouterr().out
    assert text.count(": ok") == 1 and "MISMATCH" not in text
    assert text.strip().splitlines()[-1].startswith("hf-grouped_mm")  # the table is printed last
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["trainer [grouped]", "hf-grouped_mm"]
    assert all(r["tokens_per_s"] > 0 for r in report["results"])
    assert report["overrides"] == {"bias_update_gamma": 0.01}


def test_bench_on_real_text(tmp_path, capsys):
    """--data: the text tokenized as `dsmoe train` does; the model keeps the preset's vocabulary (padded), so
    transformers gets the same shapes; both see the same windows."""
    pytest.importorskip("transformers")
    text = tmp_path / "text.txt"
    text.write_text(open(bench.__file__).read())  # real text that is always there
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--micro-batch", "1", "--seq-len", "16",
                              "--steps", "1", "--warmup", "1", "--variants", "trainer", "hf-grouped_mm",
                              "--moe-impl", "grouped", "--data", str(text), "--set", "vocab_size=300"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == 1 and "MISMATCH" not in out
