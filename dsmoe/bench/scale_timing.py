"""Timing pieces of `dsmoe bench scale`: device-agnostic stopwatch spans, the NCCL all-to-all replay, and the
split of step time into compute / exposed communication / idle from a profiler trace.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist


class Stopwatch:
    """Spans timed on the device's own clock: CUDA events (no host sync while recording), or the host clock
    on the CPU, where collectives are synchronous."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: list[tuple[object, object, object]] = []

    @contextmanager
    def span(self, tag: object = None):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._spans.append((tag, start, end))

    def results(self) -> list[tuple[object, float]]:
        """(tag, seconds) of every span so far; waits for the device once."""
        if self.cuda:
            torch.cuda.synchronize()
            return [(tag, s.elapsed_time(e) / 1e3) for tag, s, e in self._spans]
        return [(tag, e - s) for tag, s, e in self._spans]

    def clear(self) -> None:
        self._spans.clear()


class DispatchRecorder:
    """Hooks every expert-parallel layer's dispatch all-to-all (of hidden states) and records its bytes,
    split sizes and time, so the same transfers can be replayed by a bare all_to_all_single."""

    def __init__(self, device: torch.device):
        self.watch = Stopwatch(device)
        self.enabled = False

    def attach(self, ep_modules) -> None:
        for module in ep_modules:
            module.dispatch_timer = lambda nbytes, m=module: self._span(m, nbytes)

    def _span(self, module, nbytes: int):
        if not self.enabled:
            return nullcontext()
        row_bytes = nbytes // max(1, sum(module.last_send_pairs))
        return self.watch.span((list(module.last_send_pairs), list(module.last_recv_pairs), row_bytes, nbytes))

    def calls(self) -> list[tuple[list[int], list[int], int, int, float]]:
        """(send splits, recv splits, bytes per row, bytes sent, seconds) per recorded dispatch."""
        return [(*tag, seconds) for tag, seconds in self.watch.results()]


def replay_all_to_all(calls, device: torch.device, group, repeats: int = 3) -> float:
    """Seconds a bare all_to_all_single takes for the same transfers (same splits, same bytes), summed over
    the calls (each call's fastest of `repeats`). Every rank of the group calls it with its own calls."""
    watch = Stopwatch(device)
    total = 0.0
    for send, recv, row_bytes, _, _ in calls:
        x = torch.empty(sum(send) * row_bytes, dtype=torch.uint8, device=device)
        y = torch.empty(sum(recv) * row_bytes, dtype=torch.uint8, device=device)
        in_splits, out_splits = [n * row_bytes for n in send], [n * row_bytes for n in recv]
        dist.all_to_all_single(y, x, out_splits, in_splits, group=group)  # warm-up, absorbs rank skew
        watch.clear()
        for _ in range(repeats):
            with watch.span():
                dist.all_to_all_single(y, x, out_splits, in_splits, group=group)
        total += min(seconds for _, seconds in watch.results())
    return total


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def step_time_split(kernels: list[tuple[str, float, float]]) -> dict[str, float]:
    """Shares of the window from the first kernel's start to the last kernel's end: compute (some non-NCCL
    kernel runs), exposed communication (only NCCL kernels run), idle (nothing runs: host syncs, launch
    gaps). kernels: (name, start, end) in any time unit."""
    if not kernels:
        return {}
    compute = [(s, e) for name, s, e in kernels if "nccl" not in name.lower()]
    window = max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)
    busy = _union_length([(s, e) for _, s, e in kernels])
    compute_busy = _union_length(compute)
    return {"compute": compute_busy / window, "exposed_comm": (busy - compute_busy) / window,
            "idle": (window - busy) / window}


def kernels_from_trace(trace_file: str | Path) -> list[tuple[str, float, float]]:
    """GPU kernels (name, start us, end us) of a Chrome trace written by torch.profiler."""
    events = json.loads(Path(trace_file).read_text()).get("traceEvents", [])
    return [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("cat") == "kernel" and e.get("ph") == "X" and "dur" in e]
