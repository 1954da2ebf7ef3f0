"""A sequence classifier: the transformer body with a linear `score` head (no bias) in place of the LM head,
read at each sequence's last token, as transformers' DeepseekV3ForSequenceClassification (and V2's) does.

Its checkpoint is the hub layout of that class: the body's `model.*` keys plus `score.weight` (num_labels x
hidden), and config.json with `architectures: [...ForSequenceClassification]`, `id2label`, `label2id`,
`num_labels`. `load_pretrained` builds this class for such a folder; fine-tuning writes one.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.errors import UserError
from dsmoe.model.transformer import Transformer


NOT_A_LANGUAGE_MODEL = ("this model folder is a sequence classifier (a `score` head over its labels, no language "
                        "model head): it classifies (dsmoe eval --task ...) but cannot generate or score text")


class SequenceClassifier(Transformer):
    def __init__(self, config: ModelConfig, labels: list[str], moe_impl: str = "auto"):
        super().__init__(config, moe_impl)
        self.lm_head = None
        self.labels = list(labels)
        self.score = nn.Linear(config.hidden_size, len(labels), bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        raise UserError(NOT_A_LANGUAGE_MODEL)

    def classify(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S), right-padded, with `lengths` (B,) real tokens each -> class logits (B, num_labels)
        in fp32, from the hidden state of each sequence's last real token."""
        real = None
        if lengths is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            real = positions[None, :] < lengths.to(input_ids.device)[:, None]
        h = super().forward(input_ids, return_hidden=True, token_mask=real)
        last = (lengths - 1) if lengths is not None else torch.full((h.shape[0],), h.shape[1] - 1)
        pooled = h[torch.arange(h.shape[0], device=h.device), last.to(h.device)]
        return self.score(pooled).float()


def classifier_input(tokenizer, text: str, max_len: int) -> list[int]:
    """The tokens a classification head reads for one text: BOS, then the text, its first `max_len` tokens.
    Fine-tuning trains on these and `dsmoe eval --task` scores with them, so the head sees at evaluation what
    it learned from (no prompt template around the text)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return [*bos, *tokenizer.encode(str(text), add_special_tokens=False)][:max_len]


def classifier_labels(hf_config: dict) -> list[str] | None:
    """The label names of a classifier's config.json in id order, or None when it is not a classifier."""
    if not any(str(a).endswith("ForSequenceClassification") for a in hf_config.get("architectures") or []):
        return None
    id2label = hf_config.get("id2label") or {}
    num_labels = hf_config.get("num_labels") or len(id2label)
    try:
        labels = [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(num_labels)]
    except KeyError:
        raise UserError(f"config.json's id2label ({id2label}) does not name every one of its {num_labels} "
                        "labels 0..num_labels-1; fix id2label") from None
    return labels


def classifier_hub_fields(model: SequenceClassifier) -> dict:
    """config.json fields that make a saved folder a classifier for transformers and for load_pretrained."""
    from dsmoe.config import ARCHITECTURES

    config = model.config
    arch = ARCHITECTURES[config.model_type].replace("ForCausalLM", "ForSequenceClassification")
    # transformers pools at the rightmost token that is not pad_token_id: a batch must be padded with it
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return {"architectures": [arch], "num_labels": len(model.labels), "pad_token_id": pad,
            "id2label": {str(i): label for i, label in enumerate(model.labels)},
            "label2id": {label: i for i, label in enumerate(model.labels)}}
