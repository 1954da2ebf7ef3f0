"""What `dsmoe bench moe` measures: the layer shapes, the layers (dsmoe, transformers, the dense
ceiling), Zipf-skewed routing, and the timer (CUDA events, warm-up, median over fresh inputs)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerShape:
    label: str
    d: int
    f: int
    experts: int
    k: int
    shared: int
    scoring: str
    method: str
    n_group: int
    topk_group: int
    norm: bool
    scale: float

    def model_flops(self, tokens: int) -> float:
        """Forward + backward model FLOPs: 2*T*(k+shared)*3*d*f per forward, x3 (no router, no padding)."""
        return 3 * 2 * tokens * (self.k + self.shared) * 3 * self.d * self.f


SHAPES = {
    "lite": LayerShape("V2-Lite", 2048, 1408, 64, 6, 2, "softmax", "greedy", 1, 1, False, 1.0),
    "fine": LayerShape("fine", 2048, 512, 128, 8, 1, "sigmoid", "noaux_tc", 8, 4, True, 2.5),
    "v3": LayerShape("V3", 7168, 2048, 256, 8, 1, "sigmoid", "noaux_tc", 8, 4, True, 2.5),
    "tiny": LayerShape("tiny", 64, 32, 8, 2, 1, "sigmoid", "noaux_tc", 2, 1, True, 2.5),  # CPU smoke runs
}


def dsmoe_layer(shape: LayerShape, device: torch.device, dtype: torch.dtype, impl: str):
    """dsmoe's MoE layer (router, experts, shared experts) with random weights; router kept in fp32.
    Balance losses are off: transformers computes none, and they are not part of the kernels' work."""
    from dsmoe.presets import get_preset
    from dsmoe.model.moe import MoE

    base = get_preset("deepseek-v2-lite" if shape.scoring == "softmax" else "deepseek-v3")
    zero_losses = {k: 0.0 for k in ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha")
                   if hasattr(base, k)}
    config = base.replace(
        hidden_size=shape.d, moe_intermediate_size=shape.f, n_routed_experts=shape.experts,
        num_experts_per_tok=shape.k, n_shared_experts=shape.shared, scoring_func=shape.scoring,
        topk_method=shape.method, n_group=shape.n_group, topk_group=shape.topk_group,
        norm_topk_prob=shape.norm, routed_scaling_factor=shape.scale, **zero_losses)
    with torch.device("meta"):
        layer = MoE(config, impl)
    layer.to(dtype)
    layer.gate.float()
    layer.to_empty(device=device)
    layer.reset_parameters(0.02)
    return layer


def hf_layer(shape: LayerShape, like, implementation: str):
    """transformers' DeepseekV3MoE sharing the parameters of the dsmoe layer `like` (no extra memory).
    Its router is always sigmoid + group top-2 (V3); for softmax shapes its routing therefore differs."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=shape.d, moe_intermediate_size=shape.f, n_routed_experts=shape.experts,
        num_experts_per_tok=shape.k, n_shared_experts=shape.shared, n_group=shape.n_group,
        topk_group=shape.topk_group, norm_topk_prob=shape.norm, routed_scaling_factor=shape.scale,
        hidden_act="silu", experts_implementation=implementation)
    with torch.device("meta"):
        hf = DeepseekV3MoE(config)
    hf.experts.gate_up_proj = like.experts.gate_up_proj
    hf.experts.down_proj = like.experts.down_proj
    hf.gate.weight = like.gate.weight
    bias = like.gate.e_score_correction_bias
    hf.gate.e_score_correction_bias = bias if bias is not None else torch.zeros(
        shape.experts, device=like.gate.weight.device)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(hf.shared_experts, name).weight = getattr(like.shared_experts, name).weight
    return hf


def same_routing_as_hf(shape: LayerShape) -> bool:
    return shape.scoring == "sigmoid" and shape.method == "noaux_tc"


class DenseMLP(torch.nn.Module):
    """The ceiling: one dense SwiGLU MLP of width (k+shared)*f, the same FLOPs as the MoE layer."""

    def __init__(self, shape: LayerShape, device: torch.device, dtype: torch.dtype):
        super().__init__()
        width = (shape.k + shape.shared) * shape.f
        self.gate_up = torch.nn.Parameter(torch.randn(2 * width, shape.d, device=device, dtype=dtype) * 0.02)
        self.down = torch.nn.Parameter(torch.randn(shape.d, width, device=device, dtype=dtype) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


def zipf_routing(tokens: int, k: int, experts: int, seed: int, device: torch.device) -> torch.Tensor:
    """topk_idx [T, k] with Zipf-like expert loads: the busiest expert gets 4x the mean load, the last
    eighth of the experts get nothing, every token still picks k distinct experts."""
    active = experts - experts // 8
    n = tokens * k
    lo, hi = 0.0, 8.0  # exponent s with sum_{r<=active} r^-s = experts/4, i.e. max load = 4 * n/experts
    for _ in range(60):
        s = (lo + hi) / 2
        total = sum(r ** -s for r in range(1, active + 1))
        lo, hi = (s, hi) if total > experts / 4 else (lo, s)
    share = torch.tensor([r ** -lo for r in range(1, active + 1)], dtype=torch.float64)
    exact = share / share.sum() * n
    loads = exact.floor().long()
    loads[torch.argsort(exact - loads, descending=True)[: n - int(loads.sum())]] += 1
    loads = loads.clamp(max=tokens)  # an expert takes each token at most once (only tiny shapes clamp)
    for r in reversed(range(active)):
        loads[r] += min(tokens - int(loads[r]), n - int(loads.sum()))
    slots = torch.repeat_interleave(torch.arange(active), loads)  # expert of each slot, grouped
    # slot j goes to token j % T as its (j // T)-th choice: an expert's <= T slots hit distinct tokens
    idx = slots.view(k, tokens).t()
    relabel = torch.randperm(experts, generator=torch.Generator().manual_seed(seed))
    return relabel[idx].to(device)


def time_steps(step, inputs, device: torch.device, max_seconds: float, warmup: int = 2) -> dict:
    """Median milliseconds of `step(x, dy)` over fresh inputs, and the peak memory of the timed steps."""
    for i in range(warmup):
        step(*inputs[i % len(inputs)])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step(*inputs[0])
    sync()
    estimate = time.perf_counter() - t0
    iters = max(3, min(25, int(max_seconds / max(estimate, 1e-6))))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i, (start, end) in enumerate(events):
            start.record()
            step(*inputs[i % len(inputs)])
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated(device)
        return dict(ms=statistics.median(times), iters=iters, peak_gb=peak / 1e9, extra_gb=(peak - before) / 1e9)
    times = []
    for i in range(iters):
        t = time.perf_counter()
        step(*inputs[i % len(inputs)])
        times.append((time.perf_counter() - t) * 1e3)
    return dict(ms=statistics.median(times), iters=iters, peak_gb=float("nan"), extra_gb=float("nan"))


def saved_for_backward_gb(module, x: torch.Tensor) -> float:
    """GB of the distinct tensors autograd keeps from `module(x)` for its backward, counting neither the module's
    parameters nor x (they exist without it): what every layer of a model holds at once until its backward
    runs, so what decides how many tokens fit. Temporaries of the forward and of the backward are the peak's."""
    exclude = {t.untyped_storage().data_ptr() for t in (x, *module.parameters())}
    kept, alive = {}, []

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            kept[storage.data_ptr()] = storage.nbytes()
        # Held here, detached, until the forward ends, as the graph would hold it (else its memory is reused and a
        # later tensor at the same address replaces its entry). Not packed as itself: a saved output would hold
        # its own grad_fn, a cycle that outlives the call with the parameters' gradient accumulators, which then
        # belong to this stream and break a later CUDA graph capture on another one.
        alive.append(t.detach())

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed):
        module(x)
    return sum(kept.values()) / 1e9


def time_graph(step, inputs, device: torch.device, max_seconds: float, release, warmup: int = 2) -> dict:
    """Like `time_steps`, but the step (forward + backward) is captured once in a CUDA graph and replayed:
    the GPU time without Python and launch overhead. Fresh inputs are copied into the captured buffers
    before each replay, outside the timed region. Raises if the step cannot be captured (host syncs).
    `release()` drops the warm-up's gradients before capturing: the graph's private memory pool cannot
    reuse the blocks they leave cached (a V3 layer's gradients are 22 GB)."""
    x, dy = (t.detach().clone() for t in inputs[0])
    x.requires_grad_(inputs[0][0].requires_grad)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (autotuning, lazy init) happens outside the capture
        for _ in range(warmup):
            step(x, dy)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    release()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x, dy)
    graph.replay()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize(device)
    iters = max(3, min(50, int(max_seconds / max(time.perf_counter() - t0, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        src_x, src_dy = inputs[i % len(inputs)]
        with torch.no_grad():
            x.copy_(src_x)
            dy.copy_(src_dy)
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del graph, x, dy
    release()
    torch.cuda.empty_cache()
    return dict(ms=statistics.median(s.elapsed_time(e) for s, e in events), iters=iters, peak_gb=peak / 1e9,
                extra_gb=(peak - before) / 1e9, cuda_graph=True)


def kernel_profile(step, inputs, steps: int = 3) -> str:
    """Per-kernel and per-kind GPU time of a few steps: where the layer's time goes."""
    from dsmoe.bench.profiling import cuda_profile, kernel_table

    with cuda_profile() as prof:
        for i in range(steps):
            step(*inputs[i % len(inputs)])
    return kernel_table(prof, steps)


def relative_errors(ours: dict, ref: dict) -> dict:
    """||a - b|| / ||b|| per output, in fp32."""
    out = {}
    for name, b in ref.items():
        a = ours[name].float()
        b = b.float()
        out[name] = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    return out
