"""`dsmoe bench moe` end to end on the CPU with the tiny shape: the harness, not the speed."""

import argparse
import json

import pytest
import torch

from dsmoe.bench import moe as bench_moe
from dsmoe.bench.moe_layers import SHAPES, zipf_routing
from dsmoe.errors import UserError


def bench_args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    bench_moe.add_arguments(parser)
    argv = ["--device", "cpu", "--shapes", "tiny", "--tokens", "16", "--seconds", "0.01",
            "--impls", "dense,grouped,reference,hf-grouped,hf-eager", "--json", str(tmp_path / "moe.json")]
    args = parser.parse_args(argv)
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@pytest.fixture
def one_thread():
    """Tiny ops on a loaded 2-core machine: intra-op threads only spin against each other."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_bench_runs_every_variant_and_checks_errors(tmp_path, capsys, one_thread):
    pytest.importorskip("transformers")
    assert bench_moe.run(bench_args(tmp_path)) == 0
    result = json.loads((tmp_path / "moe.json").read_text())
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "dsmoe grouped", "dsmoe reference", "hf-grouped", "hf-eager"}
    assert all(r["ms"] > 0 and "FAILED" not in r.get("note", "") for r in rows.values())
    # the tiny shape routes like transformers (sigmoid, noaux_tc), so HF shares weights *and* results
    for impl in ("dsmoe reference", "hf-grouped", "hf-eager"):
        assert rows[impl]["max_rel_err"] < 1e-5, impl
    flops = SHAPES["tiny"].model_flops(16)
    assert rows["dense"]["tflops"] == pytest.approx(flops / rows["dense"]["ms"] / 1e9)
    assert result["skew"] and result["skew"][0]["max_over_mean"] == pytest.approx(4.0, rel=0.05)
    assert "max rel err" in capsys.readouterr().out


def test_on_the_cpu_triton_is_skipped_with_a_note_not_a_failed_row(tmp_path, capsys, one_thread):
    """The default --impls include triton: `--device cpu` printed a FAILED row and a traceback."""
    assert bench_moe.run(bench_args(tmp_path, impls="dense,triton")) == 0
    rows = json.loads((tmp_path / "moe.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["dense"]
    captured = capsys.readouterr()
    assert "dsmoe triton skipped: its kernels need a CUDA GPU" in captured.out
    assert "Traceback" not in captured.err and "host-device sync" not in captured.out


def test_bench_rejects_unknown_shapes(tmp_path):
    with pytest.raises(UserError, match="unknown shape"):
        bench_moe.run(bench_args(tmp_path, shapes="huge"))


@pytest.mark.parametrize("T, k, E", [(512, 6, 64), (300, 8, 256), (32, 2, 8)])
def test_zipf_routing_is_skewed_dropless_and_distinct(T, k, E):
    idx = zipf_routing(T, k, E, seed=0, device=torch.device("cpu"))
    counts = torch.bincount(idx.flatten(), minlength=E)
    assert counts.sum() == T * k
    assert counts.max() / (T * k / E) == pytest.approx(4.0, rel=0.05)
    assert (counts == 0).sum() >= E // 8
    assert all(len(set(row.tolist())) == k for row in idx)
