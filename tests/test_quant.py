"""Weight-only fp8 / int8: the formats, the Triton decode kernels against `dequantize` + the plain path, and
whole quantized models against their full-precision selves.

Without a GPU the kernels run in Triton's interpreter in fp32 (tests/conftest.py selects it); the tests
marked `gpu` add bf16 at DeepSeek-V2-Lite dims and CUDA-graph capture.
"""

import json

import pytest
import torch

from dsmoe.presets import get_preset
from dsmoe.kernels.quant import dequantize, quantize, quantize_fp8
from dsmoe.model.quantized import QuantExperts, QuantLinear, quantize_model, weight_bytes
from dsmoe.kernels.reference import moe_experts_reference
from dsmoe.model.transformer import build_model
from triton_guard import DEVICE, require_triton

SCHEMES = ["fp8", "int8"]


def _kernels():
    require_triton()
    from dsmoe.kernels import triton_quant

    return triton_quant


def quant_moe_decode(x, idx, w, gu, gs, dn, ds):
    """The decode MoE kernels on quantized stacks (the op `ops.quant_moe_experts` calls at decode sizes)."""
    from dsmoe.kernels.triton_moe_decode import moe_decode

    return moe_decode(x, idx, w, gu, dn, gs, ds)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme,bound", [("fp8", 0.05), ("int8", 0.01)])
def test_quantization_error_is_that_of_the_format(scheme, bound):
    w = torch.randn(3, 200, 300)  # partial 128-blocks on both axes, and a leading expert dim
    q, s = quantize(w, scheme)
    assert q.dtype == (torch.float8_e4m3fn if scheme == "fp8" else torch.int8) and q.shape == w.shape
    assert s.shape == ((3, 2, 3) if scheme == "fp8" else (3, 200))
    assert 1e-4 < rel(dequantize(q, s), w) < bound


def test_fp8_codes_that_are_exact_survive_unchanged():
    """A weight already on the fp8 grid of its block scale comes back bit for bit (DeepSeek's own codes)."""
    codes = torch.randint(-100, 100, (256, 130)).float().to(torch.float8_e4m3fn)
    codes[0, 0] = 448.0  # each block's largest code is the format's maximum, so amax/448 recovers the scale
    codes[0, 128] = 448.0
    codes[128, 0] = 448.0
    codes[128, 128] = 448.0
    scale = torch.tensor([[0.5, 2.0], [0.25, 4.0]])
    w = dequantize(codes, scale)
    q, s = quantize_fp8(w)
    assert torch.equal(s, scale) and torch.equal(q.view(torch.uint8), codes.view(torch.uint8))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (5, 200, 300), (17, 70, 129)])
def test_wq_matmul_equals_dequantize_then_linear(scheme, M, N, K):
    tq = _kernels()
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(DEVICE)
    q, s = quantize(torch.randn(N, K, generator=g) / K**0.5, scheme)
    q, s = q.to(DEVICE), s.to(DEVICE)
    out = tq.wq_matmul(x, q, s)
    assert rel(out, x @ dequantize(q, s).T) < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("block_n,block_k", [(16, 64), (32, 128), (16, 128)])
def test_every_wq_matmul_tile_the_autotuner_may_pick_is_exact(scheme, block_n, block_k):
    """The autotuner keeps whichever tile is fastest, so each candidate must be right: 64-wide K blocks take two
    steps per fp8 scale block, and narrow column tiles end inside a scale block."""
    import triton

    from dsmoe.kernels.triton_configs import dot_precision

    tq = _kernels()
    g = torch.Generator().manual_seed(block_n + block_k)
    M, N, K = 3, 200, 300
    x = torch.randn(M, K, generator=g).to(DEVICE)
    q, s = quantize(torch.randn(N, K, generator=g) / K**0.5, scheme)
    codes, fp8 = tq.codes_view(q.to(DEVICE))
    s = s.to(DEVICE).float().contiguous()
    y = torch.empty(M, N, device=DEVICE)
    tq._wq_matmul_kernel.fn[(triton.cdiv(N, block_n), 1)](
        x, codes, s, y, M, N, tq.scale_strides(s, fp8)[1], K=K, FP8=fp8, PRECISION=dot_precision(x.dtype),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k)
    assert rel(y, x @ dequantize(q.to(DEVICE), s).T) < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("T,D,F,E,K,empty", [(1, 128, 64, 4, 2, ()), (3, 160, 136, 5, 2, (1,)),
                                              (4, 72, 40, 6, 3, (0, 5))])
def test_moe_decode_on_codes_equals_the_reference_on_dequantized_weights(scheme, T, D, F, E, K, empty):
    _kernels()  # skips without a GPU or the interpreter
    g = torch.Generator().manual_seed(T + D + F)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    x, w = torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    gu, gs = quantize(torch.randn(E, 2 * F, D, generator=g) / D**0.5, scheme)
    dn, ds = quantize(torch.randn(E, D, F, generator=g) / F**0.5, scheme)
    ref = moe_experts_reference(x, idx, w, dequantize(gu, gs), dequantize(dn, ds))
    to = [t.to(DEVICE) for t in (x, idx, w, gu, gs, dn, ds)]
    assert rel(quant_moe_decode(*to), ref.to(DEVICE)) < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_is_close_to_the_model_and_smaller(scheme):
    torch.manual_seed(0)
    config = get_preset("tiny")
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        before = model(ids)
        full_bytes = weight_bytes(model)
        quantize_model(model, scheme)
        after = model(ids)
    assert any(isinstance(m, QuantExperts) for m in model.modules())
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "o_proj", "gate_proj")
                   for n, m in model.named_modules())
    assert rel(after, before) < (0.05 if scheme == "fp8" else 0.01)
    quantized = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_proj"))
    assert quantized > 0
    assert weight_bytes(model) < 0.8 * full_bytes  # the tiny preset's embedding and lm_head stay full precision


def test_unknown_scheme_is_one_clear_error():
    from dsmoe.errors import UserError

    with pytest.raises(UserError, match="fp8, int8"):
        quantize(torch.randn(4, 4), "int4")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_kernels_at_v2_lite_dims_and_in_a_cuda_graph(scheme):
    tq = _kernels()
    c = get_preset("deepseek-v2-lite")
    D, F, E, K, T = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, device="cuda", generator=g)
    gu, gs = quantize(torch.randn(E, 2 * F, D, device="cuda", generator=g) / D**0.5, scheme)
    dn, ds = quantize(torch.randn(E, D, F, device="cuda", generator=g) / F**0.5, scheme)
    ref = moe_experts_reference(x.double(), idx, w.double(), dequantize(gu, gs).double(), dequantize(dn, ds).double())
    out = quant_moe_decode(x, idx, w, gu, gs, dn, ds)
    assert rel(out, ref) < 1e-2
    lin = tq.wq_matmul(x, gu[0], gs[0])
    assert rel(lin, x.double() @ dequantize(gu[0], gs[0]).double().T) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = quant_moe_decode(x, idx, w, gu, gs, dn, ds)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)


def _saved_model(tmp_path, **changes):
    from dsmoe import save_pretrained
    from dsmoe.config import ModelConfig

    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                         n_shared_experts=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                         v_head_dim=16, max_position_embeddings=128, **changes)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    save_pretrained(model, tmp_path)
    return model


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_load_pretrained_quantizes_a_full_precision_checkpoint_like_quantize_model(tmp_path, scheme):
    import copy

    from dsmoe import load_pretrained

    model = _saved_model(tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.float32, quantize=scheme).eval()
    direct = quantize_model(copy.deepcopy(model), scheme)
    for (name, a), (_, b) in zip(loaded.named_buffers(), direct.named_buffers()):
        if name.endswith(("_proj", ".weight", "_scale")):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), name
    with torch.no_grad():
        assert torch.equal(loaded(IDS), direct.eval()(IDS))


def _fp8_checkpoint(folder, keep_float: str = "") -> dict:
    """A saved model rewritten as V3's release stores it (projections as FP8 codes + block scale_inv), except
    keys containing `keep_float`; returns the rewritten tensors."""
    import json

    from safetensors.torch import load_file, save_file

    _saved_model(folder)
    fp8 = {}
    for key, t in load_file(folder / "model.safetensors").items():
        if key.endswith(("proj.weight", "proj_with_mqa.weight")) and not (keep_float and keep_float in key):
            fp8[key], fp8[key + "_scale_inv"] = quantize_fp8(t)
        else:
            fp8[key] = t
    save_file(fp8, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    return fp8


def test_a_v3_fp8_checkpoint_keeps_its_own_codes_and_scales(tmp_path):
    from dsmoe import load_pretrained

    fp8 = _fp8_checkpoint(tmp_path)
    quant = load_pretrained(tmp_path, dtype=torch.float32, quantize="fp8").eval()
    experts = quant.layers[1].mlp.experts
    up_key = "model.layers.1.mlp.experts.2.up_proj.weight"
    assert torch.equal(experts.gate_up_proj[2, 128:].view(torch.uint8), fp8[up_key].view(torch.uint8))
    assert torch.equal(experts.gate_up_proj_scale[2, 1:], fp8[up_key + "_scale_inv"])
    q_proj = quant.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.weight.view(torch.uint8), fp8["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8))
    dequantized = load_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(quant(IDS), dequantized(IDS), rtol=1e-5, atol=1e-5)


def test_an_fp8_checkpoint_with_one_expert_in_full_precision_loads_every_expert(tmp_path):
    """Native FP8 experts arrive before and after the float one: none may be lost when the float expert is
    quantized at load (the stacked tensor is requantised whole)."""
    from dsmoe import load_pretrained

    _fp8_checkpoint(tmp_path, keep_float=".mlp.experts.1.")
    quant = load_pretrained(tmp_path, dtype=torch.float32, quantize="fp8").eval()
    codes = quant.layers[1].mlp.experts.gate_up_proj.float()
    assert (codes.flatten(1).abs().amax(1) > 0).all()
    # quantizing the dequantized model gives the stored FP8 codes back, and the float expert's codes
    direct = quantize_model(load_pretrained(tmp_path, dtype=torch.float32), "fp8").eval()
    with torch.no_grad():
        torch.testing.assert_close(quant(IDS), direct(IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "fp8"])
@pytest.mark.parametrize("cut", [(2, 1), (3, 3)])
def test_an_fp8_scale_inv_of_the_wrong_shape_is_one_checkpoint_error(tmp_path, quantize, cut):
    from safetensors.torch import save_file

    from dsmoe import load_pretrained
    from dsmoe.errors import CheckpointError

    fp8 = _fp8_checkpoint(tmp_path)
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    fp8[key] = torch.ones(cut)
    save_file(fp8, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"q_proj.weight_scale_inv has shape \\[{cut[0]}, {cut[1]}\\]"):
        load_pretrained(tmp_path, dtype=torch.float32, quantize=quantize)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_quantize_flag_on_the_cli(tmp_path, model_dir, command, capsys):
    from dsmoe.cli import main

    folder = model_dir
    if command == "generate":
        args = ["generate", str(folder), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]
    else:
        (tmp_path / "t.txt").write_text("import os\nprint(os.getcwd())\n" * 40)
        args = ["eval", str(folder), "--data", str(tmp_path / "t.txt"), "--seq-len", "32"]
    outputs = []
    for extra in ([], ["--quantize", "int8"]):
        assert main(args + extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[1].strip()
    if command == "eval":  # int8 moves the loss by well under a percent on this model
        losses = [float(o.split("loss ")[1].split()[0]) for o in outputs]
        assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 0.01 * losses[0]


def test_quantize_benchmark_compares_memory_perplexity_and_greedy_continuations(tmp_path, model_dir, capsys):
    """dsmoe bench quantize: the unquantized reference agrees with itself, the quantized rows are smaller and
    their perplexity and continuations are measured against it."""
    from dsmoe.bench.quantize import agreement
    from dsmoe.cli import main

    assert agreement([[1, 2, 3], [4, 5]], [[1, 2, 4], [4, 5]]) == (0.5, 2.0)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + len(str(x))\n\n" for i in range(60)))
    out = tmp_path / "q.json"
    assert main(["bench", "quantize", str(model_dir), "--text", str(text), "--num-prompts", "3", "--prompt-len", "6",
                 "--new-tokens", "5", "--seq-len", "64", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| float32 |" in table and "| fp8 |" in table and "| int8 |" in table
    results = json.loads(out.read_text())["results"]
    assert results["float32"]["identical_continuations"] == 1.0 and results["float32"]["mean_agreeing_tokens"] == 5
    for scheme in ("fp8", "int8"):
        r = results[scheme]
        assert r["weights_gb"] < 0.8 * results["float32"]["weights_gb"]
        assert r["perplexity"] != results["float32"]["perplexity"]
        assert abs(r["perplexity"] / results["float32"]["perplexity"] - 1) < 0.05
        assert 0 <= r["identical_continuations"] <= 1 and 0 <= r["mean_agreeing_tokens"] <= 5


def test_quantized_experts_read_codes_per_decision_up_to_four_decisions_an_expert(monkeypatch):
    """Past DECODE_MAX_ROWS decisions the bf16 experts take the permuted path, but dequantising every expert moves
    5 bytes a weight: quantized experts keep the per-decision kernels up to 4 decisions an expert, and both paths
    give the same output."""
    _kernels()
    from dsmoe.kernels import ops

    E, D, F, K = 20, 64, 32, 6
    g = torch.Generator().manual_seed(0)
    gu, gs = (t.to(DEVICE) for t in quantize(torch.randn(E, 2 * F, D, generator=g) / D**0.5, "fp8"))
    dn, ds = (t.to(DEVICE) for t in quantize(torch.randn(E, D, F, generator=g) / F**0.5, "fp8"))
    monkeypatch.setattr(ops, "triton_available", lambda device: True)  # the interpreter runs them on the CPU
    paths, summed, experts = [], ops._summed_decode, ops.moe_experts
    monkeypatch.setattr(ops, "_summed_decode", lambda *a: paths.append("decode") or summed(*a))
    monkeypatch.setattr(ops, "moe_experts", lambda *a: paths.append("dequantised") or experts(*a))
    outputs = {}
    for tokens in (ops.DECODE_MAX_ROWS // K + 1, 4 * E // K, 4 * E // K + 1):
        x = torch.randn(tokens, D, generator=g).to(DEVICE)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).to(DEVICE)
        w = torch.rand(tokens, K, generator=g).to(DEVICE)
        outputs[tokens] = ops.quant_moe_experts(x, idx, w, gu, gs, dn, ds, "reference")
        reference = moe_experts_reference(x, idx, w, dequantize(gu, gs), dequantize(dn, ds))
        assert rel(outputs[tokens], reference) < 1e-5
    assert paths == ["decode", "decode", "dequantised"]
