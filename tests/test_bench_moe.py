"""`dsmoe bench moe` end to end on the CPU with the tiny shape: the harness, not the speed."""

import argparse
import gc
import json
from dataclasses import replace

import pytest
import torch

from dsmoe.bench import moe as bench_moe
from dsmoe.bench.moe_layers import SHAPES, zipf_routing
from dsmoe.errors import UserError
from triton_guard import require_triton


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
    assert all(r["saved_gb"] > 0 for r in rows.values())  # every layer keeps something for its backward
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


def test_triton_layer_keeps_for_backward_under_half_of_what_transformers_keeps():
    """The Triton layer keeps gate_up's output (N x 2F) and the int32 plan, never the gathered input or the down
    projection's rows (N x D each), as transformers' grouped_mm does. Fine's ratios (d = 4f, k = 8), small."""
    require_triton()
    pytest.importorskip("transformers")
    from dsmoe.bench import moe_layers as L

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, tokens = replace(SHAPES["fine"], d=128, f=32, experts=16), 32
    layer = L.dsmoe_layer(shape, device, torch.float32, impl="triton")
    x = torch.randn(1, tokens, shape.d, device=device, requires_grad=True)
    gate_up_out = tokens * shape.k * 2 * shape.f * 4
    ours = L.saved_for_backward_gb(layer, x) * 1e9
    theirs = L.saved_for_backward_gb(L.hf_layer(shape, layer, "grouped_mm"), x) * 1e9
    assert gate_up_out <= ours <= 2 * gate_up_out  # + the shared expert's and the router's: not N x D more
    assert ours <= 0.5 * theirs


def test_measuring_what_the_forward_keeps_leaves_no_graph_alive():
    """A saved output packed as itself held its own grad_fn: the graph (and the parameters' gradient accumulators,
    bound to the stream that made them) outlived the call, and the next CUDA graph capture of the layer failed."""
    import weakref

    from dsmoe.bench import moe_layers as L

    kept = []

    class SavesItsOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = torch.sigmoid(self.linear(x))  # sigmoid's backward needs its output
            kept.append(weakref.ref(y))
            for _ in range(7):
                y = torch.sigmoid(y)  # each output saved, each one dropped by Python at once
            return y

    x = torch.randn(256, 8, requires_grad=True)
    # the linear's output (saved by nothing here) is not counted; eight sigmoid outputs of 256 x 8 floats are
    assert L.saved_for_backward_gb(SavesItsOutput(), x) * 1e9 == 8 * 256 * 8 * 4
    gc.collect()
    assert kept[0]() is None
