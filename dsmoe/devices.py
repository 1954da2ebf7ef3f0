"""Where and in what precision a command runs: the values of --device and --dtype, read in one place."""

from __future__ import annotations

import torch

from dsmoe.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return device


def add_device_argument(parser) -> None:
    """The --device flag every model-running command shares (resolved by `resolve_device`)."""
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")


def add_moe_impl_argument(parser) -> None:
    """The --moe-impl flag every model-running command shares (the model resolves it per MoE forward)."""
    from dsmoe.kernels.ops import IMPLS

    parser.add_argument("--moe-impl", default="auto", choices=IMPLS,
                        help="routed-experts implementation: auto (the fastest available), reference, grouped, triton")


def release_models(device: torch.device) -> None:
    """Free the memory of models no longer named, between a benchmark's variants: torch.compile's caches hold the
    modules they compiled (a V2-Lite fp8 copy stayed on the GPU, and quantising the next copy ran out of memory
    on an 80 GB card), so each compiled variant also compiles from scratch."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
