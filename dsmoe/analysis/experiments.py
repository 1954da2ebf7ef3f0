"""The experiments of `dsmoe experiment`: each one a list of ordinary `dsmoe train` configs (arms x seeds).

All arms of one experiment share the data, the token budget, the optimizer and, per seed, the batch order and
the weights outside the FFNs (`paired_init`), so a difference between arms within one seed is the architecture's
(or the balancing's), and the spread of those paired differences over seeds says how far to trust it.

- architectures (DeepSeekMoE paper, Table 1, scaled down): Dense (FFN width F) vs GShard-style (E coarse experts
  of width F/2, top-2, no shared expert) vs DeepSeekMoE (the same expert parameters split m-fold finer: 1 shared
  + m*E - 1 routed experts of width F/(2m), top-(2m - 1)); equal active parameters per token. Both MoE arms use
  the paper's softmax gate with the expert-level balance loss (alpha 0.01), so only the architecture differs.
- balancing (loss-free balancing paper): the DeepSeekMoE architecture with V3's sigmoid gate, balanced by the
  aux loss only (alpha 0.001), by the bias update only, or by both. The bias moves by u per step, so it can
  travel u x steps: the paper's u = 0.001 is set for long runs, and a run of a few hundred steps also gets
  u = 0.01 (on the CPU scale u = 0.003-0.01 balanced best, u = 0.03 oscillated).
- shared-experts: the DeepSeekMoE architecture with 0, 1 or 2 shared experts (equal active and total params).
- granularity: m = 1, 2, 4, 8 (no shared expert; equal active and total params).
- adaptive-routing: the DeepSeekMoE architecture with V3's gate, fixed top-k vs top-p routing (p = k / routed
  experts, 1 to 2k experts) whose regulariser holds the mean at k; training logs the experts per token, and
  `dsmoe analyze` reports their distribution.
- mtp (DeepSeek-V3's multi-token prediction): the DeepSeekMoE architecture with V3's gate, trained with and
  without one MTP module (lambda 0.3); the validation loss is the main model's own in both arms.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsmoe.errors import UserError
from dsmoe.train.config import TrainConfig

EXPERIMENTS = ("architectures", "balancing", "shared-experts", "granularity", "adaptive-routing", "mtp")
SCALES = ("cpu", "gpu")


@dataclass(frozen=True)
class Scale:
    """Model shape and budget of one scale: every arm is built from these."""

    hidden: int
    layers: int
    heads: int
    ffn: int  # F: the dense FFN width = the active expert width of every arm
    coarse_experts: int  # E of the GShard arm
    granularity: int  # m of the DeepSeekMoE arm
    vocab: int
    seq_len: int
    micro_batch: int
    steps: int
    lr: float
    eval_interval: int
    eval_tokens: int
    corpus_limit_mb: float | None


SCALE = {
    # 2 CPU cores: ~0.4M-parameter models, a few minutes per experiment on the built-in corpus
    "cpu": Scale(hidden=64, layers=2, heads=2, ffn=256, coarse_experts=4, granularity=4, vocab=1024, seq_len=64,
                 micro_batch=8, steps=150, lr=3e-3, eval_interval=25, eval_tokens=8192, corpus_limit_mb=2.0),
    # one H200, all of `architectures` + `balancing` (12 runs, 4 in parallel) in about 5 minutes:
    # 250 steps x 16,384 tokens = 4.1M tokens per run
    "gpu": Scale(hidden=256, layers=4, heads=4, ffn=1024, coarse_experts=8, granularity=4, vocab=8192, seq_len=512,
                 micro_batch=32, steps=250, lr=2e-3, eval_interval=50, eval_tokens=65536, corpus_limit_mb=30.0),
}


def _attention(s: Scale) -> dict:
    head = max(s.hidden // s.heads, 16)
    return dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                kv_lora_rank=s.hidden // 4, q_lora_rank=None, qk_nope_head_dim=head // 2,
                qk_rope_head_dim=head // 4, v_head_dim=head // 2, intermediate_size=s.ffn,
                first_k_dense_replace=0, max_position_embeddings=max(s.seq_len, 1024))


def dense(s: Scale) -> dict:
    return {**_attention(s), "n_routed_experts": None}


def moe(s: Scale, m: int, shared: int, gate: str) -> dict:
    """m-fold finer experts than GShard's (E experts of width F/2, top-2), `shared` of them made shared experts;
    gate 'softmax' (the DeepSeekMoE paper's, with its balance loss) or 'sigmoid' (V3's, with the bias)."""
    width = s.ffn // (2 * m)
    if width < 1 or 2 * m - shared < 1:
        raise UserError(f"granularity {m} with {shared} shared experts does not fit an FFN of {s.ffn}")
    routing = dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False) if gate == "softmax" else \
        dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)
    return {**_attention(s), **routing, "n_routed_experts": m * s.coarse_experts - shared,
            "num_experts_per_tok": 2 * m - shared, "n_shared_experts": shared, "moe_intermediate_size": width,
            "n_group": 1, "topk_group": 1}


def arms(name: str, s: Scale) -> dict[str, dict]:
    """-> {arm: TrainConfig overrides}; the first arm is the reference of the paired differences."""
    m = s.granularity
    if name == "architectures":
        return {"dense": {"model": dense(s)},
                "gshard": {"model": moe(s, 1, 0, "softmax"), "aux_loss_alpha": 0.01, "bias_update_gamma": 0.0},
                "deepseekmoe": {"model": moe(s, m, 1, "softmax"), "aux_loss_alpha": 0.01, "bias_update_gamma": 0.0}}
    if name == "balancing":
        model = moe(s, m, 1, "sigmoid")
        return {"aux-loss": {"model": model, "aux_loss_alpha": 0.001, "bias_update_gamma": 0.0},
                "aux-free": {"model": model, "aux_loss_alpha": 0.0, "bias_update_gamma": 0.001},
                "aux-free-u0.01": {"model": model, "aux_loss_alpha": 0.0, "bias_update_gamma": 0.01},
                "both": {"model": model, "aux_loss_alpha": 0.001, "bias_update_gamma": 0.001}}
    if name == "shared-experts":
        return {f"shared-{k}": {"model": moe(s, m, k, "sigmoid"), "aux_loss_alpha": 0.0, "bias_update_gamma": 0.001}
                for k in (0, 1, 2)}
    if name == "granularity":
        return {f"m={g}": {"model": moe(s, g, 0, "sigmoid"), "aux_loss_alpha": 0.0, "bias_update_gamma": 0.001}
                for g in (1, 2, 4, 8)}
    if name == "adaptive-routing":  # fixed top-k vs top-p held at the same mean experts per token
        fixed = moe(s, m, 1, "sigmoid")
        k, routed = fixed["num_experts_per_tok"], fixed["n_routed_experts"]
        # near-uniform scores (a fresh router) reach p after about p * routed experts: p = k / routed starts the
        # router at its target. With p 0.5 and 31 experts it started at k_max = 14, and the regulariser's pull from
        # there cost 0.15-0.55 in loss (README, adaptive routing).
        adaptive = {**fixed, "num_experts_per_tok": min(2 * k, routed), "routing_top_p": round(k / routed, 4),
                    "routing_min_k": 1, "routing_target_k": float(k), "routing_k_loss_alpha": 0.01}
        return {"top-k": {"model": fixed, "aux_loss_alpha": 0.0, "bias_update_gamma": 0.001},
                "top-p": {"model": adaptive, "aux_loss_alpha": 0.0, "bias_update_gamma": 0.001}}
    if name == "mtp":
        model = moe(s, m, 1, "sigmoid")
        return {"no-mtp": {"model": model, "aux_loss_alpha": 0.0, "bias_update_gamma": 0.001},
                "mtp": {"model": model, "aux_loss_alpha": 0.0, "bias_update_gamma": 0.001, "mtp_layers": 1}}
    raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")


@dataclass(frozen=True)
class Row:
    arm: str
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def experiment_rows(name: str, scale: str, *, data: list[str], seeds: list[int], only: list[str] | None = None,
                    steps: int | None = None, text_field: str = "text", device: str = "auto",
                    moe_impl: str = "auto") -> list[Row]:
    if scale not in SCALE:
        raise UserError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
    s = SCALE[scale]
    table = arms(name, s)
    unknown = sorted(set(only or []) - set(table))
    if unknown:
        raise UserError(f"--arms {unknown[0]}: {name} has the arms {', '.join(table)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {seeds}: give one or more distinct seeds")
    steps = steps or s.steps
    # a longer run reads proportionally more of the corpus (the same share of an epoch: no text repeats that the
    # scale's own budget would not repeat) and evaluates about 20 times
    longer = max(1.0, steps / s.steps)
    corpus_mb = None if s.corpus_limit_mb is None else s.corpus_limit_mb * longer
    common = dict(preset="tiny", data=list(data), text_field=text_field, corpus_limit_mb=corpus_mb,
                  vocab_size=s.vocab, seq_len=s.seq_len, micro_batch=s.micro_batch, steps=steps, lr=s.lr,
                  warmup_steps=max(1, steps // 10), eval_interval=min(max(s.eval_interval, steps // 20), steps),
                  eval_tokens=s.eval_tokens, checkpoint_interval=steps, keep_checkpoints=1,
                  log_interval=max(1, min(10, steps // 10)), paired_init=True, device=device, moe_impl=moe_impl)
    return [Row(arm, seed, TrainConfig(**common, **overrides, seed=seed))
            for seed in seeds for arm, overrides in table.items() if not only or arm in only]
