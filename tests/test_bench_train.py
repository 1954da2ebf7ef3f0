"""`dsmoe bench train` end to end on the CPU at toy size: every variant runs from the same weights and batch,
the first-step losses agree, the table and the JSON come out. (Timings on the CPU mean nothing.)"""

import argparse
import json

import pytest

from dsmoe.bench import train as bench


def test_bench_runs_and_checks_against_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--micro-batch", "1", "--seq-len", "16",
                              "--steps", "1", "--warmup", "1", "--variants", "dsmoe", "dsmoe-amp", "hf-grouped_mm",
                              "--json", str(out)])
    assert bench.run(args) == 0
    text = capsys.readouterr().out
    assert text.count(": ok") == 2 and "MISMATCH" not in text
    assert text.strip().splitlines()[-1].startswith("hf-grouped_mm")  # the table is printed last
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["dsmoe [grouped]", "dsmoe-amp [grouped]", "hf-grouped_mm"]
    assert all(r["tokens_per_s"] > 0 for r in report["results"])
