"""ModelConfig: the architecture of a DeepSeekMoE-family model, with Hugging Face DeepSeek field names.

A real `config.json` of deepseek-moe-16b (`model_type` "deepseek"), DeepSeek-V2/V2-Lite ("deepseek_v2") or
DeepSeek-V3 ("deepseek_v3") maps onto it one to one through `from_hf_dict`; `to_hf_dict` writes it back in
the hub spelling (`rope_theta` + `rope_scaling`) that both the hub's remote code and transformers 5 read.
Every behaviour switch is a field (see `../shared/reference/deepseek_arch.md` for the formulas).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from dsmoe.errors import UserError

SUPPORTED_MODEL_TYPES = ("deepseek", "deepseek_v2", "deepseek_v3")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ARCHITECTURES = {
    "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


ADAPTIVE_ROUTING_FIELDS = ("routing_top_p", "routing_min_k", "routing_target_k", "routing_k_loss_alpha")
ADAPTIVE_SUFFIX = "_dsmoe_adaptive"


class ConfigError(UserError):
    """A model configuration that cannot describe a valid model; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "deepseek_v3"  # "deepseek" (16B, MHA) | "deepseek_v2" | "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 4096  # width of the dense SwiGLU layers
    moe_intermediate_size: int = 512  # width of one routed (and one shared) expert
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # MHA/GQA only; None = num_attention_heads
    # --- mixture of experts
    n_routed_experts: int | None = 64  # None = every layer dense
    n_shared_experts: int = 2  # merged into one MLP of width n_shared_experts * moe_intermediate_size
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1  # the first k layers keep a dense MLP
    moe_layer_freq: int = 1  # layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0
    scoring_func: str = "sigmoid"  # "softmax" (V1/V2) | "sigmoid" (V3)
    topk_method: str = "noaux_tc"  # "greedy" | "group_limited_greedy" (V2: max per group) | "noaux_tc" (V3)
    n_group: int = 1  # expert groups (devices / nodes) for group-limited routing
    topk_group: int = 1  # groups a token may use
    norm_topk_prob: bool = True  # renormalise the K gate weights to sum to 1 (before the scaling factor)
    routed_scaling_factor: float = 1.0  # multiplies the routed gate weights
    # Adaptive routing (dsmoe only, off by default): a token takes experts in order of affinity until their
    # normalised scores reach routing_top_p, at least routing_min_k and at most num_experts_per_tok (k_max);
    # routing_k_loss_alpha * (mean soft count - routing_target_k)^2 holds the mean count at the target.
    routing_top_p: float | None = None
    routing_min_k: int = 1
    routing_target_k: float | None = None
    routing_k_loss_alpha: float = 0.0
    router_fp32: bool = True  # V2/V3 route in fp32; the 16B hub code routes in the model dtype
    aux_loss_alpha: float = 0.0  # expert-level balance loss weight (training only)
    seq_aux: bool = True  # balance loss per sequence (True) or over the whole micro-batch (False)
    # V2's device-level (alpha_2) and communication (alpha_3) balance losses over the expert-to-device layout;
    # without expert parallelism the routing groups (n_group) stand in for the devices
    device_aux_loss_alpha: float = 0.0
    comm_aux_loss_alpha: float = 0.0
    # --- attention: MLA when kv_lora_rank is set, else MHA/GQA with head_dim = hidden / heads
    q_lora_rank: int | None = None  # None = one q_proj (V2-Lite); else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int | None = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # --- positions and norms
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor": ..., ...} or None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    # --- vocabulary and init
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.006  # std of every weight at init, as in the DeepSeekMoE/V3 papers
    num_nextn_predict_layers: int = 0  # V3's MTP modules (model/mtp.py), stored as layers num_hidden_layers..

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived values (properties, never rewritten fields)
    @property
    def use_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head width of MHA (16B model); MLA uses the qk_*/v_head_dim fields instead."""
        return self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.use_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.use_mla else self.head_dim

    @property
    def rope_interleaved(self) -> bool:
        """MLA checkpoints pair rotary dims as (2i, 2i+1); the 16B MHA model uses Llama halves."""
        return self.use_mla

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling and self.rope_scaling.get("mscale_all_dim"):
            m = yarn_mscale(self.rope_scaling["factor"], self.rope_scaling["mscale_all_dim"])
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        """Layers from num_hidden_layers on are the MTP modules' blocks: MoE whenever the model has experts
        (transformers' get_mtp_config sets first_k_dense_replace=0 for them)."""
        if i >= self.num_hidden_layers:
            return self.n_routed_experts is not None
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_ids(self) -> list[int]:
        """MoE layers, the MTP modules' (ids num_hidden_layers + k) included."""
        layers = range(self.num_hidden_layers + self.num_nextn_predict_layers)
        return [i for i in layers if self.is_moe_layer(i)]

    @property
    def main_moe_layer_ids(self) -> list[int]:
        """The main model's MoE layers (those an evaluation runs; the MTP modules run only in training)."""
        return [i for i in self.moe_layer_ids if i < self.num_hidden_layers]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- parameter counts (embedding and head included, as the papers count them; the MTP modules are not,
    # as V3's 671B does not count its 14B MTP module)
    def num_params(self, active: bool = False) -> int:
        d = self.hidden_size
        attn = self._attention_params()
        dense_mlp = 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        total = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d  # embed, head, final norm
        for i in range(self.num_hidden_layers):
            total += attn + 2 * d
            if self.is_moe_layer(i):
                routed = self.num_experts_per_tok if active else self.n_routed_experts
                total += expert * (routed + self.n_shared_experts) + self.n_routed_experts * d
            else:
                total += dense_mlp
        return total

    def _attention_params(self) -> int:
        d, h = self.hidden_size, self.num_attention_heads
        if not self.use_mla:
            return d * h * self.head_dim + 2 * d * self.kv_heads * self.head_dim + h * self.head_dim * d
        q = d * h * self.qk_head_dim if self.q_lora_rank is None else (
            d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        )
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    # ---- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if isinstance(model_type, str) and model_type.endswith(ADAPTIVE_SUFFIX):
            model_type = model_type.removesuffix(ADAPTIVE_SUFFIX)
            hf = {**hf, "model_type": model_type}
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not a DeepSeek model; dsmoe reads "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in known}
        theta, scaling = _rope_from_hf(hf)
        kwargs["rope_theta"], kwargs["rope_scaling"] = theta, scaling
        if isinstance(kwargs.get("eos_token_id"), list):  # generation may stop at several; the first is the model's
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
        # transformers writes null for fields its class does not use; fall back to each version's default
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k in _NULLABLE}
        if kwargs.get("kv_lora_rank") is not None:
            kwargs["num_key_value_heads"] = None  # meaningless under MLA; transformers writes the head count
        if model_type == "deepseek":
            kwargs.setdefault("kv_lora_rank", None)  # MHA: the absence of kv_lora_rank is the signal
            kwargs.update(scoring_func="softmax", topk_method="greedy", router_fp32=False)
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("aux_loss_alpha", 0.001)
        elif model_type == "deepseek_v2":
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("aux_loss_alpha", 0.001)
        else:
            kwargs.setdefault("scoring_func", "sigmoid")
            kwargs.setdefault("topk_method", "noaux_tc")
            kwargs.setdefault("norm_topk_prob", True)
            kwargs.setdefault("aux_loss_alpha", 0.0001)
            kwargs.setdefault("num_nextn_predict_layers", hf.get("num_mtp_layers", 0))
        for name in ("n_group", "topk_group"):
            if kwargs.get(name) is None:
                kwargs[name] = 1
        kwargs.setdefault("initializer_range", 0.006)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [ARCHITECTURES[self.model_type]]}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        out["hidden_act"] = "silu"
        out["attention_bias"] = False
        out["num_key_value_heads"] = self.kv_heads
        if self.model_type == "deepseek_v3":
            out["rope_interleave"] = True
        out.pop("router_fp32")  # implied by model_type; no hub config carries it
        if self.routing_top_p is None:
            for name in ADAPTIVE_ROUTING_FIELDS:
                out.pop(name)
        else:  # transformers would silently route top-k_max: a model_type it does not know makes it refuse
            out["model_type"] = self.model_type + ADAPTIVE_SUFFIX
            out["dsmoe_note"] = ("adaptive (top-p) routing: only dsmoe runs this model; transformers routes a "
                                 "fixed top-k and cannot reproduce it")
        return out


_NULLABLE = {"routing_top_p", "routing_target_k", "n_routed_experts", "q_lora_rank", "kv_lora_rank", "rope_scaling",
             "bos_token_id",
             "eos_token_id", "pad_token_id", "num_key_value_heads"}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Accept both the hub spelling (rope_theta + rope_scaling) and transformers 5's rope_parameters."""
    for name in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(name) or {}, dict):
            raise ConfigError(f"{name} is {hf[name]!r}: it must be an object such as {{\"type\": \"yarn\", "
                              "\"factor\": ...}} or null")
    params = hf.get("rope_parameters")
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        return _as_float(theta), (None if rope_type == "default" else {"type": rope_type, **params})
    scaling = hf.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        scaling["type"] = scaling.pop("rope_type", scaling.get("type", "default"))
        if scaling["type"] == "default":
            scaling = None
    return _as_float(hf.get("rope_theta", 10000.0)), scaling


def _as_float(value: Any) -> Any:
    """Integers as floats (config files write 10000 for 10000.0); anything else is left for the type check."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def check_types(config: Any, fail) -> None:
    """Every field of a config dataclass against its annotation; `fail(name, why)` reports the first that does
    not fit. The one place where values from config.json, train_config.json and flags meet their types."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        wanted = _unfit(hints[f.name], getattr(config, f.name))
        if wanted is not None:
            fail(f.name, f"must be {wanted}")


def _unfit(annotation: Any, value: Any) -> str | None:
    """None when value fits the annotation, else what the annotation asks for, in words."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(options) < len(typing.get_args(annotation))
        wanted = [_unfit(a, value) for a in options]
        if (value is None and nullable) or None in wanted:
            return None
        return " or ".join(wanted) + (" or null" if nullable else "")
    kind, args = typing.get_origin(annotation) or annotation, typing.get_args(annotation)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {
        bool: (isinstance(value, bool), "true or false"),
        int: (number and isinstance(value, int), "an integer"),
        float: (number and math.isfinite(value), "a finite number"),
        str: (isinstance(value, str), "a string"),
        dict: (isinstance(value, dict), "an object"),
        list: (isinstance(value, list) and all(_unfit(args[0], v) is None for v in value), "a list"),
    }
    if annotation is Any:
        return None
    fits, words = checks[kind]  # a KeyError here: a new kind of field needs its check above
    return None if fits else words


def _validate(c: ModelConfig) -> None:
    def fail(name: str, why: str) -> None:
        raise ConfigError(f"invalid model config: {name}={getattr(c, name)!r}: {why}")

    check_types(c, fail)  # the checks below compare numbers
    if c.model_type not in SUPPORTED_MODEL_TYPES:
        fail("model_type", f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings"):
        if getattr(c, name) <= 0:
            fail(name, "must be positive")
    if c.num_nextn_predict_layers < 0:
        fail("num_nextn_predict_layers", "must be >= 0 (the number of MTP modules)")
    if c.scoring_func not in SCORING_FUNCS:
        fail("scoring_func", f"use one of {', '.join(SCORING_FUNCS)}")
    if c.topk_method not in TOPK_METHODS:
        fail("topk_method", f"use one of {', '.join(TOPK_METHODS)}")
    if c.n_routed_experts is not None:
        if c.n_routed_experts <= 0:
            fail("n_routed_experts", "must be positive (or null for an all-dense model)")
        if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
            fail("num_experts_per_tok", f"must be between 1 and n_routed_experts={c.n_routed_experts}")
        if c.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", "must be positive")
        if c.n_shared_experts < 0:
            fail("n_shared_experts", "must be >= 0")
        for name in ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha"):
            if getattr(c, name) < 0:
                fail(name, "must be >= 0")
        if c.moe_layer_freq <= 0:
            fail("moe_layer_freq", "must be >= 1")
        if c.first_k_dense_replace < 0:
            fail("first_k_dense_replace", "must be >= 0")
        if c.n_group <= 0 or c.n_routed_experts % c.n_group:
            fail("n_group", f"must divide n_routed_experts={c.n_routed_experts}")
        if not 1 <= c.topk_group <= c.n_group:
            fail("topk_group", f"must be between 1 and n_group={c.n_group}")
        per_group = c.n_routed_experts // c.n_group
        if c.topk_method != "greedy" and c.topk_group * per_group < c.num_experts_per_tok:
            fail("topk_group", f"topk_group * experts per group ({per_group}) must be >= num_experts_per_tok")
        if c.topk_method == "noaux_tc" and c.n_group > 1 and per_group < 2:
            fail("n_group", "noaux_tc scores a group by its top-2 experts: each group needs at least 2")
        if c.topk_method == "noaux_tc" and c.scoring_func != "sigmoid":
            fail("topk_method", "noaux_tc (aux-loss-free V3 routing) needs scoring_func='sigmoid'")
        if c.routing_top_p is not None:
            if not 0 < c.routing_top_p <= 1:
                fail("routing_top_p", "must be in (0, 1] (or null for fixed top-k routing)")
            if not 1 <= c.routing_min_k <= c.num_experts_per_tok:
                fail("routing_min_k", f"must be between 1 and num_experts_per_tok={c.num_experts_per_tok} (k_max)")
            if c.routing_target_k is not None and not c.routing_min_k <= c.routing_target_k <= c.num_experts_per_tok:
                fail("routing_target_k", "must lie between routing_min_k and num_experts_per_tok")
            if c.routing_k_loss_alpha < 0 or (c.routing_k_loss_alpha > 0 and c.routing_target_k is None):
                fail("routing_k_loss_alpha", "must be >= 0, and needs routing_target_k when > 0")
    if c.use_mla:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(c, name) <= 0:
                fail(name, "must be positive")
        if c.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (rotary pairs)")
        if c.q_lora_rank is not None and c.q_lora_rank <= 0:
            fail("q_lora_rank", "must be positive or null")
    else:
        if c.hidden_size % c.num_attention_heads:
            fail("num_attention_heads", f"must divide hidden_size={c.hidden_size}")
        if c.num_attention_heads % c.kv_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads={c.num_attention_heads}")
        if c.head_dim % 2:
            fail("hidden_size", "hidden_size / num_attention_heads must be even for rotary embeddings")
    if c.rope_scaling is not None:
        kind = c.rope_scaling.get("type")
        if kind != "yarn":
            fail("rope_scaling", "dsmoe implements rope_scaling type 'yarn' (DeepSeek's) or none")
        if "factor" not in c.rope_scaling or "original_max_position_embeddings" not in c.rope_scaling:
            fail("rope_scaling", "yarn needs 'factor' and 'original_max_position_embeddings'")
        for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
            if key in c.rope_scaling and _unfit(float, c.rope_scaling[key]) is not None:
                fail("rope_scaling", f"its {key} must be a finite number")
