"""The decode-sized MoE kernels (dsmoe/kernels/triton_moe_decode.py): routed experts read where they lie, shared
experts folded in as always-on decisions. Against the reference maths and the reference MoE layer, in the dispatch
(decode sizes, inference only), under torch.compile, and through the engine's cached greedy decode.

Without a GPU the kernels run in Triton's CPU interpreter in fp32 (tests/conftest.py selects it); the test
marked `gpu` adds bf16 parity with the permuted Triton path at DeepSeek-V2-Lite dims and CUDA-graph capture.
"""

import pytest
import torch
import torch.nn.functional as F

from triton_guard import DEVICE, ON_GPU, require_triton

require_triton(module_level=True)

from dsmoe.presets import get_preset  # noqa: E402
from dsmoe.kernels import ops  # noqa: E402
from dsmoe.kernels.reference import moe_experts_reference  # noqa: E402
from dsmoe.kernels.triton_moe_decode import moe_decode  # noqa: E402
from dsmoe.model.moe import MoE  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def expert_inputs(T, D, F_, E, K, S, dtype=torch.float32, seed=0):
    """x, idx, w, gate_up, down and the shared MLP's (gate, up, down) of width S*F (None when S == 0); experts
    0 and E-1 are never chosen."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.arange(1, E - 1)
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)]).reshape(T, K)
    x, w = torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    gate_up, down = torch.randn(E, 2 * F_, D, generator=g) / D**0.5, torch.randn(E, D, F_, generator=g) / F_**0.5
    shapes = ((S * F_, D), (S * F_, D), (D, S * F_))
    shared = tuple(torch.randn(*shape, generator=g) / shape[1]**0.5 for shape in shapes)
    to = [t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in (x, idx, w, gate_up, down, *shared)]
    to[2] = to[2].float()
    return (*to[:5], tuple(to[5:]) if S else None)


def reference_layer(x, idx, w, gate_up, down, shared):
    y = moe_experts_reference(x, idx, w, gate_up, down)
    if shared is not None:
        gate, up, dn = shared
        y = y + (F.silu(x @ gate.T) * (x @ up.T)) @ dn.T
    return y


@pytest.mark.parametrize("S", [0, 2], ids=["routed", "shared"])
@pytest.mark.parametrize("K", [1, 6, 8])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_decode_kernels_equal_the_reference(T, K, S):
    """D, F not multiples of any block; K + 3 experts, two of which no token chose."""
    x, idx, w, gate_up, down, shared = expert_inputs(T, 37, 21, K + 3, K, S, seed=T * 10 + K)
    out = moe_decode(x, idx, w, gate_up, down, shared=shared)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, reference_layer(x, idx, w, gate_up, down, shared), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S", [0, 2], ids=["routed", "shared"])
def test_decode_kernels_split_a_wide_f_over_parts(S):
    """F = 97 spans several F-tiles and both parts of the down kernel's split (the shared experts' chunks past
    the first start mid-row of their S*F-wide MLP)."""
    x, idx, w, gate_up, down, shared = expert_inputs(2, 37, 97, 6, 3, S, seed=5)
    out = moe_decode(x, idx, w, gate_up, down, shared=shared)
    torch.testing.assert_close(out, reference_layer(x, idx, w, gate_up, down, shared), atol=1e-5, rtol=1e-5)


def test_decode_kernels_refuse_shapes_that_do_not_fit():
    x, idx, w, gate_up, down, shared = expert_inputs(2, 16, 8, 4, 2, 1)
    with pytest.raises(ValueError, match="do not fit"):
        moe_decode(x, idx, w, gate_up, down[:, :8])
    with pytest.raises(ValueError, match="not S experts of width"):
        moe_decode(x, idx, w, gate_up, down, shared=(shared[0][:5], shared[1], shared[2]))


def layer_config(scoring_func: str, n_shared: int, K: int):
    base = get_preset("tiny").replace(hidden_size=40, moe_intermediate_size=24, n_routed_experts=K + 4,
                                      num_experts_per_tok=K, n_shared_experts=n_shared, n_group=1, topk_group=1,
                                      aux_loss_alpha=0.0)
    if scoring_func == "sigmoid":  # DeepSeek-V3's router: sigmoid scores, selection bias, normalised weights
        return base.replace(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                            routed_scaling_factor=2.5)
    return base.replace(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)


def counting(monkeypatch):
    calls = {"decode": 0, "permuted": 0}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(ops, "experts_decode", wrap("decode", ops.experts_decode))
    monkeypatch.setattr(ops, "experts_fused", wrap("permuted", ops.experts_fused))
    return calls


@pytest.mark.parametrize("n_shared", [0, 2], ids=["no-shared", "shared"])
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,K", [(1, 6), (5, 2)])
def test_moe_layer_at_decode_sizes_equals_the_reference_layer(monkeypatch, T, K, scoring_func, n_shared):
    torch.manual_seed(0)
    layer = MoE(layer_config(scoring_func, n_shared, K), impl="triton").to(DEVICE)
    layer.reset_parameters(0.1)
    if layer.gate.e_score_correction_bias is not None:
        layer.gate.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(1, T, 40, device=DEVICE)
    calls = counting(monkeypatch)
    with torch.no_grad():
        ours = layer(x)
        layer.impl = "reference"
        want = layer(x)
    assert calls == {"decode": 1, "permuted": 0}  # one launch pair for routed and shared experts together
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_dispatch_by_rows_gradients_and_hooks(monkeypatch):
    """Decisions count per token K routed + S shared (each reads its weights): past DECODE_MAX_ROWS the shared
    MLP runs on its own, past it with the routed ones alone the permuted path runs; training and hooks keep
    the modules' own calls."""
    torch.manual_seed(0)
    layer = MoE(layer_config("softmax", 1, 2), impl="triton").to(DEVICE)
    layer.reset_parameters(0.1)
    calls = counting(monkeypatch)
    mlp_forward = layer.shared_experts.forward
    layer.shared_experts.forward = lambda x: calls.__setitem__("mlp", calls.get("mlp", 0) + 1) or mlp_forward(x)
    limit = ops.DECODE_MAX_ROWS
    expected = [(limit // 3, {"decode": 1, "permuted": 0}),  # 3 decisions per token: folded
                (limit // 3 + 1, {"decode": 2, "permuted": 0, "mlp": 1}),  # routed alone fit
                (limit // 2 + 1, {"decode": 2, "permuted": 1, "mlp": 2})]
    with torch.no_grad():
        for tokens, want in expected:
            layer(torch.randn(1, tokens, 40, device=DEVICE))
            assert calls == want, tokens
    layer(torch.randn(1, 2, 40, device=DEVICE)).sum().backward()  # training: the differentiable path
    assert calls == {"decode": 2, "permuted": 2, "mlp": 3} and layer.experts.gate_up_proj.grad is not None
    seen = []
    handle = layer.shared_experts.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        layer(torch.randn(1, 2, 40, device=DEVICE))
    handle.remove()
    # a hook sees the shared MLP's own output; the routed experts alone take the decode kernels
    assert seen == [(2, 40)] and calls == {"decode": 3, "permuted": 2, "mlp": 4}


def test_a_router_trained_alone_gets_its_gradient_through_the_experts():
    """LoRA fine-tuning keeps the router trainable while the experts and the layer's input may want no gradient:
    the routing weights then carry the only gradient, which the forward-only decode kernels cannot give."""
    torch.manual_seed(0)
    config = layer_config("softmax", 1, 2)
    layers = [MoE(config, impl=impl).to(DEVICE) for impl in ("triton", "reference")]
    layers[0].reset_parameters(0.1)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(1, 3, 40, device=DEVICE)
    for layer in layers:
        for name, p in layer.named_parameters():
            p.requires_grad_(name == "gate.weight")
        layer(x).square().sum().backward()
    torch.testing.assert_close(layers[0].gate.weight.grad, layers[1].gate.weight.grad, atol=1e-5, rtol=1e-4)


def test_decode_layer_traces_under_torch_compile_and_the_op_passes_opcheck(monkeypatch):
    """The engine compiles whole blocks: the fold decision and the op trace without a graph break."""
    torch.manual_seed(0)
    layer = MoE(layer_config("softmax", 2, 2), impl="triton").to(DEVICE)
    layer.reset_parameters(0.1)
    x = torch.randn(1, 3, 40, device=DEVICE)
    calls = counting(monkeypatch)
    backend = "inductor" if ON_GPU else "aot_eager"
    with torch.no_grad():
        got = torch.compile(layer, backend=backend, fullgraph=True)(x)
        assert calls["decode"] >= 1 and calls["permuted"] == 0
        torch.testing.assert_close(got, layer(x), atol=1e-6, rtol=1e-6)
    x, idx, w, gate_up, down, shared = expert_inputs(3, 24, 16, 6, 2, 1)
    torch.library.opcheck(torch.ops.dsmoe.experts_decode.default, (x, idx, w, gate_up, down, None, None, *shared),
                          test_utils=("test_schema", "test_faketensor"))


def test_engine_greedy_decode_on_the_decode_kernels_equals_the_permuted_path(monkeypatch, tiny_config):
    from dsmoe.infer.generate import generate
    from dsmoe.infer.sampling import SamplingParams
    from dsmoe.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(96).replace(n_shared_experts=2), DEVICE, torch.float32, moe_impl="triton").eval()
    prompts = [[5, 17, 33, 8], [40, 2]]
    params = SamplingParams(max_new_tokens=5, temperature=0)
    calls = counting(monkeypatch)
    ours = generate(model, prompts, params, max_batch=2, cuda_graphs=False)
    assert calls["decode"] > 0 and calls["permuted"] == 0
    monkeypatch.setattr(ops, "DECODE_MAX_ROWS", 0)  # the path the decode kernels replace
    want = generate(model, prompts, params, max_batch=2, cuda_graphs=False)
    assert calls["permuted"] > 0
    assert ours == want and all(len(o) == 5 for o in ours)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8])
def test_gpu_bf16_decode_layer_matches_the_permuted_triton_path_at_v2_lite_dims(monkeypatch, T):
    """The V2-Lite MoE layer (64 experts, K=6, 2 shared of width 1408, D=2048) in bf16: the decode kernels and the
    permuted path it replaces are equally close to float64, and the decode layer captures in a CUDA graph."""
    c = get_preset("deepseek-v2-lite")
    torch.manual_seed(0)
    layer = MoE(c, impl="triton").cuda()
    layer.reset_parameters(0.02)
    layer.to(torch.bfloat16).gate.float()
    x = torch.randn(1, T, c.hidden_size, device="cuda", dtype=torch.bfloat16)
    calls = counting(monkeypatch)
    with torch.no_grad():
        ours = layer(x)
        assert calls == {"decode": 1, "permuted": 0}
        monkeypatch.setattr(ops, "DECODE_MAX_ROWS", 0)
        permuted = layer(x)
        assert calls["permuted"] == 1
        monkeypatch.setattr(ops, "DECODE_MAX_ROWS", 64)
        routing = layer.gate(x[0], "triton")
        idx, w = routing.topk_idx_TK, routing.topk_weight_TK.double()
        mlp = layer.shared_experts
        exact = reference_layer(x[0].double(), idx, w, layer.experts.gate_up_proj.double(),
                                layer.experts.down_proj.double(),
                                tuple(p.weight.double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)))
        err = {name: ((y[0].double() - exact).norm() / exact.norm()).item()
               for name, y in (("decode", ours), ("permuted", permuted))}
        assert err["decode"] <= max(1.5 * err["permuted"], 5e-3), err
        static_x = x.clone()
        layer(static_x)  # warm-up: autotuning benchmarks (and syncs) once per shape
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.testing.assert_close(static_y, layer(static_x), atol=0, rtol=0)
