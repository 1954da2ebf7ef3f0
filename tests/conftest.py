import os

import pytest
import torch

# Triton chooses between its compiler and its CPU interpreter when `triton` is first imported (transformers
# imports it too), so without CUDA the interpreter is selected here, before any test module is collected.
# It only changes how Triton kernels run, and on a machine without CUDA they can run in no other way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))
