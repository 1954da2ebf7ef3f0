"""Command-line flags for parallel runs (`dsmoe train`, `dsmoe bench scale`). No torch import here, so
building the CLI parser stays fast."""

from __future__ import annotations

import argparse

DEFAULT_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser, ac_and_compile: bool = True) -> argparse._ArgumentGroup:
    """The parallel layout flags; with ac_and_compile also --ac and --compile (`dsmoe train` has its own
    --activation-checkpointing and --compile in its training config). Returns the group, for more flags."""
    g = parser.add_argument_group("parallelism (under torchrun)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides the world size and the "
                   "number of routed experts)")
    g.add_argument("--ep-capacity-factor", type=float, metavar="F", help="sync-free expert-parallel dispatch in "
                   "training: fixed all-to-all buffers of F x the balanced share per rank, no host read per MoE "
                   "layer (CUDA-graphable); what overflows is dropped and logged as ep_dropped (--ep or more never "
                   "drops). Default: the exact dispatch (variable splits, never drops)")
    g.add_argument("--dp-shard", type=int, default=-1, help="ranks sharing the same experts (FSDP degree of the "
                   "expert weights); -1 = world size / ep")
    if ac_and_compile:
        g.add_argument("--ac", action="store_true", help="activation checkpointing per block")
        g.add_argument("--compile", action="store_true", help="torch.compile per block")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait before the job fails with an error")
    return g
