"""Inference: KV caches (MLA compressed), sampling, the continuous-batching engine; token ids in, ids out."""

from dsmoe.infer.engine import Engine, StepOutput
from dsmoe.infer.generate import generate
from dsmoe.infer.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "StepOutput", "generate"]
