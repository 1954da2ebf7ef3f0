"""The decode benchmark's own parts on the CPU: transformers gets exactly our weights, the bytes a decode step
must read are counted right, and a tiny end-to-end run prints its table."""

import argparse
import json

import pytest
import torch

from dsmoe.bench import decode
from dsmoe.presets import get_preset
from dsmoe.infer.generate import generate
from dsmoe.infer.sampling import SamplingParams
from dsmoe.model.transformer import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

pytest.importorskip("transformers")
SHRINK = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, initializer_range=0.05)


@pytest.mark.parametrize("preset,extra", [("deepseek-v2-lite", {}),
                                          ("small", dict(q_lora_rank=48, n_group=4, topk_group=2))])
def test_transformers_gets_the_same_weights(preset, extra):
    torch.manual_seed(0)
    model = build_model(get_preset(preset).replace(**SHRINK, **extra), dtype=torch.float32).eval()
    hf = decode.build_transformers(model)
    assert decode.logits_gap(model, hf, prompt_len=12) < 1e-4


def test_step_bytes_counts_touched_experts_and_cache():
    cfg = get_preset("small").replace(**SHRINK)
    model = build_model(cfg, dtype=torch.float32).eval()
    generate(model, [[3, 4, 5]], SamplingParams(max_new_tokens=2, temperature=0))  # last forward: 1 token
    from dsmoe.infer.cache import KVCache

    cache = KVCache(model.layers, 1, 8, "cpu", torch.float32)
    got = decode.step_bytes(model, cache, batch=1, context=10)
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    dense = sum(t.numel() * 4 for n, t in model.state_dict().items() if ".mlp.experts." not in n)  # + router bias
    dense -= (cfg.vocab_size - 1) * cfg.hidden_size * 4  # one embedding row read, not the table
    moe_layers = len(cfg.moe_layer_ids)
    assert got == dense + moe_layers * cfg.num_experts_per_tok * expert + 10 * 3 * (32 + 8) * 4

    from dsmoe.model.quantized import quantize_model

    quantize_model(model, "int8")  # codes of 1 byte and one fp32 scale per output row
    generate(model, [[3, 4, 5]], SamplingParams(max_new_tokens=2, temperature=0))
    int8_expert = expert // 4 + 4 * (2 * cfg.moe_intermediate_size + cfg.hidden_size)
    counts = model.routing_stats()[0]
    routed = int((counts > 0).sum()) * int8_expert
    int8_bytes = decode.step_bytes(model, cache, batch=1, context=10)
    assert int8_bytes - routed < got - moe_layers * cfg.num_experts_per_tok * expert


def test_benchmark_runs_end_to_end(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    out = tmp_path / "decode.json"
    args = parser.parse_args(["--presets", "tiny", "--batch-sizes", "1,2", "--prompt-len", "8", "--new-tokens", "4",
                              "--hf-impls", "", "--device", "cpu", "--variants", "graphs", "--json", str(out)])
    assert decode.run(args) == 0
    last_row = capsys.readouterr().out.splitlines()[-1].split()
    report = json.loads(out.read_text())
    assert report["models"]["tiny"]["check_rel_err"] < 1e-4
    assert report["device"].startswith("cpu")  # was platform.processor(), "" on most Linux builds
    result = report["models"]["tiny"]["batches"]["2"]["dsmoe"]["graphs"]
    assert 0 < result["fraction_of_bound"] and result["kernels_per_step"] > 0
    # the table printed last is the JSON's numbers: tok/s, ms/step and kernels/step of the last row
    assert last_row[:6] == ["tiny", "2", "graphs", f"{result['tokens_per_s']:.1f}", f"{result['ms_per_step']:.2f}",
                            str(result["kernels_per_step"])]


def test_kernels_per_step_counts_each_layers_work():
    """The count comes from profiling the engine's own decode step: each extra MoE block adds the same work."""
    from dsmoe.infer.engine import Engine

    counts = []
    for layers in (2, 3, 4):
        torch.manual_seed(0)
        model = build_model(get_preset("small").replace(**{**SHRINK, "num_hidden_layers": layers}),
                            dtype=torch.float32).eval()
        engine = Engine(model, max_batch=2, max_model_len=16, cuda_graphs=False)
        counts.append(decode.kernels_per_step(decode.profile_step(engine, 2, 16), cuda=False))
    assert counts[1] - counts[0] == counts[2] - counts[1] > 10


def test_kernel_table_sorts_kernels_into_kinds():
    """The --profile table: shares add up per kind, and names land in the kind a reader expects."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from dsmoe.bench.profiling import kernel_table, kind_of

    assert kind_of("_grouped_rows_kernel") == "MoE expert GEMMs (dsmoe Triton)"
    assert kind_of("_decode_down_kernel") == "MoE expert GEMMs (dsmoe Triton)"
    assert kind_of("_mla_combine_kernel") == kind_of("_mla_partial_kernel") == "attention"
    assert kind_of("_combine_kernel") == kind_of("_sort_one_program_kernel") == \
        "routing, permutation, SwiGLU backward (dsmoe Triton)"
    assert kind_of("_wq_matmul_kernel") == "GEMMs (cuBLAS / CUTLASS)"
    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMMs (cuBLAS / CUTLASS)"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention"
    assert kind_of("triton_poi_fused_add_mul_0") == "fused elementwise (torch.compile)"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>") == "elementwise (eager)"
    assert kind_of("something_new") == "other"
    events = [SimpleNamespace(key="_grouped_rows_kernel", self_device_time_total=3000.0, count=4),
              SimpleNamespace(key="nvjet_tst_gemm", self_device_time_total=1000.0, count=2),
              SimpleNamespace(key="idle", self_device_time_total=0.0, count=1),
              SimpleNamespace(key="aten::mm", self_device_time_total=1000.0, count=2, device_type=DeviceType.CPU),
              SimpleNamespace(key="## Call CompiledFxGraph f4x ##", self_device_time_total=4000.0, count=2,
                              is_user_annotation=True)]  # spans kernels counted above
    table = kernel_table(SimpleNamespace(key_averages=lambda: events), steps=2)
    assert "75.0%     1.500      2  MoE expert GEMMs (dsmoe Triton)" in table
    assert "total 2.000 ms of GPU kernels in 3 launches per step" in table


def test_copies_are_traced_back_to_the_operators_that_launched_them():
    from types import SimpleNamespace

    from dsmoe.bench.profiling import launch_origins

    def op(name, parent=None, shapes=(), kernels=()):
        return SimpleNamespace(name=name, cpu_parent=parent, input_shapes=list(shapes),
                               kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels])

    to = op("aten::to")
    events = [to, op("aten::copy_", to, [[8, 16], [8, 16], []], [("elementwise_copy_kernel", 300.0)] * 2),
              op("aten::cat", None, [[4, 2]], [("CatArrayBatchedCopy", 100.0), ("gemm_kernel", 900.0)])]
    lines = launch_origins(events, steps=2, kind="copies / memsets")
    assert lines[1].split() == ["0.300", "ms", "1", "aten::to", ">", "aten::copy_", "[[8,", "16],", "[8,", "16]]"]
    assert lines[2].split()[:4] == ["0.050", "ms", "0", "aten::cat"]  # the GEMM is not a copy
    assert len(lines) == 3 and launch_origins(events, 2, "attention") == []


def test_prefill_benchmark_runs_end_to_end(tmp_path, capsys):
    """dsmoe bench prefill on a tiny model: the engine's and transformers' prompt tokens/s, then the table."""
    from dsmoe.bench import prefill

    parser = argparse.ArgumentParser()
    prefill.add_arguments(parser)
    out = tmp_path / "prefill.json"
    args = parser.parse_args(["--presets", "tiny", "--batch-sizes", "2", "--prompt-len", "24", "--prefill-chunk", "16",
                              "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert prefill.run(args) == 0
    row = json.loads(out.read_text())["models"]["tiny"]["2"]
    assert row["dsmoe"] > 0 and row["hf-grouped_mm"] > 0
    assert "tiny                     2" in capsys.readouterr().out
