"""dsmoe: DeepSeekMoE sparse Mixture-of-Experts language models in PyTorch."""

from dsmoe.config import ModelConfig
from dsmoe.presets import PRESETS, get_preset
from dsmoe.model.transformer import Transformer, build_model

__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "build_model",
           "load_pretrained", "save_pretrained"]


def __getattr__(name):  # checkpoint I/O is imported on first use to keep `import dsmoe` light
    if name in ("load_pretrained", "save_pretrained"):
        from dsmoe.checkpoint import hf

        return getattr(hf, name)
    raise AttributeError(name)
