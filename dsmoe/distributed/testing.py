"""Multi-process tests: run fn(rank, world_size, *args) in N local processes over gloo on the CPU (or NCCL, one GPU
per process, for the GPU tests).

For tests only (the product is launched with torchrun). A free port is picked per run, every collective
has a timeout, and the whole run has a deadline, so a bug fails the test instead of hanging it; the first
exception in any rank is re-raised in the caller with its traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, timeout_s: float, backend: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # N processes share the machine's cores
    device = None
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, as dsmoe.distributed.runtime does
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            device_id=device)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Processes come from a fork server that has imported these once: starting N fresh interpreters that each
# import torch costs seconds per process, and forking the test process itself is unsafe (its thread pools).
_PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.checkpoint",
            "dsmoe.distributed.parallelize", "dsmoe.checkpoint.training"]


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120.0, backend: str = "gloo") -> None:
    """Run fn(rank, world_size, *args) on world_size processes; fn must be importable (module level).
    backend "nccl": process r owns GPU r."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    context = mp.start_processes(_entry, args=(world_size, free_port(), timeout_s, backend, fn, args),
                                 nprocs=world_size, join=False, start_method="forkserver")
    deadline = timeout_s * 2
    start = time.monotonic()
    while not context.join(timeout=1.0):
        if time.monotonic() - start > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed test did not finish within {deadline:.0f} s")
