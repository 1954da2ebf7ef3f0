"""Where the GPU time goes: per-kernel and per-kind tables of a torch.profiler run, for the benchmarks' --profile.

Kernels are sorted into kinds by name (first matching pattern wins), so a table says at a glance whether a step
is spent in GEMMs, in the MoE layer's own kernels, in attention, or in the small kernels around them. The
small kernels' names say little (a copy is a copy), so the table also traces the copies back to the operators
that launched them, with their input shapes, which is what points at the line of model code to change.
"""

from __future__ import annotations

import contextlib
import re

KINDS = (
    ("MoE expert GEMMs (dsmoe Triton)", r"_grouped_rows_kernel|_grouped_weight_grad_kernel|_decode_(up|down)_kernel"),
    ("routing, permutation, SwiGLU backward (dsmoe Triton)",
     r"_route_kernel|_histogram_kernel|_scatter_kernel|_sort_one_program_kernel|^_combine_kernel|_swiglu"),
    # before GEMMs: cuDNN's SDPA kernels say "sm90_"; _mla_* is dsmoe's MLA decode kernel and its merge
    ("attention", r"flash|fmha|attn|attention|sdpa|mha|_mla_"),
    ("GEMMs (cuBLAS / CUTLASS)", r"gemm|gemv|cutlass|nvjet|xmma|sm90_|cublas|splitk|_wq_matmul"),
    ("RMSNorm / rotary", r"norm|rotary"),
    ("optimizer", r"adam|multi_tensor"),
    ("top-k / sort", r"topk|sort|radix"),
    ("copies / memsets", r"copy|memcpy|memset|cat|index|gather|scatter|fill"),
    ("fused elementwise (torch.compile)", r"triton_poi|triton_per|triton_red"),
    ("reductions", r"reduce|sum|mean|max|softmax|logsumexp"),
    ("elementwise (eager)", r"elementwise|vectorized|unrolled"),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


@contextlib.contextmanager
def cuda_profile():
    """torch.profiler over CUDA activity; the device is drained before the profile closes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        yield prof
        torch.cuda.synchronize()


def kernel_table(prof, steps: int, top: int = 14, indent: str = "    ") -> str:
    """The `top` kernels by GPU time and the time per kind, both per step, with each one's share."""
    from torch.autograd import DeviceType

    # kernel rows only: with CPU activity recorded, the operator that launched a kernel also carries its time, and
    # a record_function range (torch.compile's "## Call CompiledFxGraph ##", "Optimizer.step") gets a GPU row
    # spanning the kernels it launched, which would count them twice
    events = [e for e in prof.key_averages()
              if e.self_device_time_total > 0 and getattr(e, "device_type", None) != DeviceType.CPU
              and not getattr(e, "is_user_annotation", False)]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_device_time_total)
    kinds: dict[str, list[float]] = {}
    for e in events:
        time_and_count = kinds.setdefault(kind_of(e.key), [0.0, 0])
        time_and_count[0] += e.self_device_time_total
        time_and_count[1] += e.count
    lines = [f"{indent}{'share':>6}  {'ms/step':>8}  {'calls':>5}  kernel"]
    lines += [f"{indent}{e.self_device_time_total / total:6.1%}  {e.self_device_time_total / steps / 1e3:8.3f}  "
              f"{e.count / steps:5.0f}  {e.key[:100]}" for e in events[:top]]
    lines += [f"{indent}by kind:"]
    lines += [f"{indent}{t / total:6.1%}  {t / steps / 1e3:8.3f}  {n / steps:5.0f}  {kind}"
              for kind, (t, n) in sorted(kinds.items(), key=lambda item: -item[1][0])]
    calls = sum(e.count for e in events) / steps
    lines.append(f"{indent}total {total / steps / 1e3:.3f} ms of GPU kernels in {calls:.0f} launches per step")
    if hasattr(prof, "events"):  # operators recorded (cuda_profile): where the copies come from
        lines += launch_origins(prof.events(), steps, "copies / memsets", indent=indent)
    return "\n".join(lines)


def launch_origins(events, steps: int, kind: str, top: int = 12, indent: str = "    ") -> list[str]:
    """Lines of a table: the kernels of one kind grouped by the operator that launched them (its outermost
    caller > itself, and its input shapes), heaviest first, per step."""
    origins: dict[str, list[float]] = {}
    for op in events:
        for kernel in getattr(op, "kernels", ()):
            if kind_of(kernel.name) != kind:
                continue
            root = op
            while root.cpu_parent is not None:
                root = root.cpu_parent
            shapes = [shape for shape in op.input_shapes if shape][:2]
            origin = f"{op.name} {shapes}" if root is op else f"{root.name[:60]} > {op.name} {shapes}"
            time_and_count = origins.setdefault(origin, [0.0, 0])
            time_and_count[0] += kernel.duration
            time_and_count[1] += 1
    if not origins:
        return []
    lines = [f"{indent}{kind} by the operator that launched them (caller > operator [input shapes]):"]
    lines += [f"{indent}{t / steps / 1e3:8.3f} ms  {n / steps:5.0f}  {origin[:140]}"
              for origin, (t, n) in sorted(origins.items(), key=lambda item: -item[1][0])[:top]]
    return lines
