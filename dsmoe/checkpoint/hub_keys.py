"""The one map between dsmoe's parameter names and the hub's checkpoint keys, both directions: stacked experts <->
per-expert keys (and transformers 5's fused expert keys), V3's MTP modules `mtp.{k}` <-> `model.layers.{L + k}`
with their copies of the shared embedding and output head."""

from __future__ import annotations

import re

import torch

from dsmoe.config import ModelConfig

# One map, both directions: dsmoe name pattern -> hub name pattern. "{}" is a layer index or a module
# name; "{e}" (hub side only) is an expert index, for the stacked expert tensors.
KEY_MAP: dict[str, str] = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "score.weight": "score.weight",  # the head of a sequence classifier (dsmoe.model.classifier)
    "layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.self_attn.{}.weight": "model.layers.{}.self_attn.{}.weight",
    "layers.{}.mlp.{}.weight": "model.layers.{}.mlp.{}.weight",  # dense gate/up/down_proj and the router
    "layers.{}.mlp.gate.e_score_correction_bias": "model.layers.{}.mlp.gate.e_score_correction_bias",
    "layers.{}.mlp.shared_experts.{}.weight": "model.layers.{}.mlp.shared_experts.{}.weight",
    "layers.{}.mlp.experts.gate_up_proj": "model.layers.{}.mlp.experts.{e}.{gate,up}_proj.weight",
    "layers.{}.mlp.experts.down_proj": "model.layers.{}.mlp.experts.{e}.down_proj.weight",
    # MTP modules (mtp.{k} in dsmoe = layers.{num_hidden_layers + k} here; see _mtp_name)
    "layers.{}.enorm.weight": "model.layers.{}.enorm.weight",
    "layers.{}.hnorm.weight": "model.layers.{}.hnorm.weight",
    "layers.{}.eh_proj.weight": "model.layers.{}.eh_proj.weight",
    "layers.{}.shared_head.norm.weight": "model.layers.{}.shared_head.norm.weight",
}
# The MTP layers' copies of the shared embedding and output head: written on save, skipped on load.
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.layers.{}.embed_tokens.weight",
                     "lm_head.weight": "model.layers.{}.shared_head.head.weight"}
MTP_COPY = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")
# transformers 5 keeps the experts fused in memory; its files (and some converted checkpoints) may too.
FUSED_EXPERT_KEYS = {
    "model.layers.{}.mlp.experts.gate_up_proj": "layers.{}.mlp.experts.gate_up_proj",
    "model.layers.{}.mlp.experts.down_proj": "layers.{}.mlp.experts.down_proj",
}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{\}|\{e\}|\{gate,up\})", template)
    groups = {"{}": r"([A-Za-z0-9_]+)", "{e}": r"(?P<e>\d+)", "{gate,up}": r"(?P<part>gate|up)"}
    return re.compile("".join(groups.get(p, re.escape(p)) for p in parts) + "$")


_HUB_TO_OURS = [(_pattern(hub), ours) for ours, hub in KEY_MAP.items()] + \
               [(_pattern(hub), ours) for hub, ours in FUSED_EXPERT_KEYS.items()]


def _mtp_name(name: str, num_hidden_layers: int, to_ours: bool) -> str:
    """layers.{L + k}.X <-> mtp.{k}.X (L = num_hidden_layers); other names unchanged."""
    m = re.match(r"(layers|mtp)\.(\d+)\.(.*)", name)
    if not m:
        return name
    kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if to_ours and kind == "layers" and i >= num_hidden_layers:
        return f"mtp.{i - num_hidden_layers}.{rest}"
    if not to_ours and kind == "mtp":
        return f"layers.{num_hidden_layers + i}.{rest}"
    return name


def hub_to_ours(key: str, num_hidden_layers: int) -> tuple[str, int | None, str | None] | None:
    """Hub key -> (dsmoe parameter name, expert index or None, "gate"/"up"/"down" or None)."""
    for pattern, ours in _HUB_TO_OURS:
        m = pattern.match(key)
        if not m:
            continue
        groups = [g for i, g in enumerate(m.groups(), 1) if i not in _named_indices(pattern)]
        name = _mtp_name(ours.format(*groups), num_hidden_layers, to_ours=True)
        e = m.groupdict().get("e")
        part = m.groupdict().get("part") or ("down" if e is not None else None)
        return name, (int(e) if e is not None else None), part
    return None


def _named_indices(pattern: re.Pattern) -> set[int]:
    return set(pattern.groupindex.values())


def ours_to_hub(name: str, tensor: torch.Tensor, config: ModelConfig):
    """dsmoe parameter -> [(hub key, tensor)], splitting stacked experts into per-expert tensors and adding the
    MTP layers' copies of the embedding and head."""
    L = config.num_hidden_layers
    copies = [name] + (["lm_head.weight"] if name == "embed_tokens.weight" and config.tie_word_embeddings else [])
    for shared in copies:
        if shared in MTP_SHARED_COPIES:
            for k in range(config.num_nextn_predict_layers):
                yield MTP_SHARED_COPIES[shared].format(L + k), tensor
    name = _mtp_name(name, L, to_ours=False)
    layer = name.split(".")[1] if name.startswith("layers.") else None
    if name.endswith("mlp.experts.gate_up_proj"):
        F = tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight", tensor[e, :F]
            yield f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight", tensor[e, F:]
        return
    if name.endswith("mlp.experts.down_proj"):
        for e in range(tensor.shape[0]):
            yield f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight", tensor[e]
        return
    yield (name if name in ("lm_head.weight", "score.weight") else f"model.{name}"), tensor
