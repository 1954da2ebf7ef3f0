"""Where the Triton kernels can run: on a CUDA GPU, or on the CPU through Triton's interpreter, which must be
switched on before triton is imported (tests/conftest.py sets TRITON_INTERPRET=1)."""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def require_triton(module_level: bool = False) -> None:
    """Skip the calling test (module_level: the whole module, called at import) where the kernels cannot run."""
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without CUDA, Triton kernels need TRITON_INTERPRET=1 set before triton is imported "
                    "(tests/conftest.py does it)", allow_module_level=module_level)
    pytest.importorskip("triton")
