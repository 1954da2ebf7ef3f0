"""A classification head on a pretrained base, and its folder in transformers' layout.

The head itself is dsmoe.model.classifier.SequenceClassifier (shared with `dsmoe eval --task classify`): the
final hidden state of each sequence's last real token through `score.weight` [num_labels, hidden], no bias,
as DeepseekV2/V3ForSequenceClassification. `save_pretrained` writes it as `model.*` + `score.weight` with a config.json
naming that architecture, id2label, label2id, num_labels and pad_token_id, so
`AutoModelForSequenceClassification.from_pretrained(DIR)` loads it with equal logits. Batches are right-padded
with pad_token_id (the base's pad token, else its eos) and texts are encoded without a trailing eos, so
transformers' rule (the rightmost token that is not the pad id) picks the same token as our lengths.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.model.classifier import SequenceClassifier
from dsmoe.model.transformer import Transformer


def pad_id_of(config) -> int:
    """The id batches are right-padded with: transformers pools at the rightmost token that is not this id."""
    return config.pad_token_id if config.pad_token_id is not None else config.eos_token_id


def classifier_from_base(base: Transformer, labels: list[str]) -> SequenceClassifier:
    """The base's body (its weights, moved, not copied) under a freshly initialised score head."""
    config = base.config.replace(num_nextn_predict_layers=0)  # MTP predicts tokens, which a classifier does not
    with torch.device("meta"):
        classifier = SequenceClassifier(config, labels, base.moe_impl)
    classifier.embed_tokens, classifier.layers, classifier.norm = base.embed_tokens, base.layers, base.norm
    classifier.rotary = base.rotary
    classifier.score = new_score(base.config, len(labels), base.embed_tokens.weight.device)
    return classifier


def new_score(config, num_labels: int, device: torch.device) -> nn.Linear:
    """A fresh head, N(0, initializer_range), drawn from `device`'s generator (on the meta device: nothing drawn)."""
    score = nn.Linear(config.hidden_size, num_labels, bias=False, device=device)
    nn.init.normal_(score.weight, std=config.initializer_range)
    return score


def lengths_of(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Real tokens per right-padded row, by transformers' rule (the rightmost non-pad position + 1)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1) + 1
