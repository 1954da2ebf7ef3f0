"""TrainConfig: everything that defines a training run, written as `train_config.json` into the run folder.

`dsmoe train` builds its flags from these fields (the help text is each field's `help`), so a run started
from flags and one started from `--config RUN/train_config.json` are the same run. The defaults are the
`make run` job: the `tiny` preset on the built-in corpus, about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsmoe.config import ModelConfig, check_types
from dsmoe.presets import PRESETS, get_preset
from dsmoe.data.tokenizer import MIN_VOCAB
from dsmoe.errors import UserError
from dsmoe.json_files import read_json
from dsmoe.kernels.ops import IMPLS as MOE_IMPLS

SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "fp32", "bf16")
BALANCE_SCOPES = ("sequence", "batch")
MTP_TARGETS = ("tokens", "model")
COMPILE_SCOPES = ("blocks", "model")  # dsmoe.distributed.parallelize.COMPILE_SCOPES
PARAM_DTYPES = ("fp32", "bf16")
# Every numeric field's allowed values ("[" closed, "(" open); the type check has already made each a finite number
RANGES = {
    "corpus_limit_mb": "(0, inf)", "val_fraction": "[0, 1)", "vocab_size": "[1, inf)", "seq_len": "[1, inf)",
    "micro_batch": "[1, inf)", "grad_accum": "[1, inf)", "steps": "[1, inf)", "tokens": "[1, inf)",
    "lr": "(0, inf)", "min_lr_ratio": "[0, 1]", "warmup_steps": "[0, inf)", "decay_fraction": "[0, 1]",
    "weight_decay": "[0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": "[0, inf)", "dropout": "[0, 1)",
    "aux_loss_alpha": "[0, inf)", "bias_update_gamma": "[0, inf)", "seed": f"[0, {2**63})",
    "max_skipped_steps": "[1, inf)", "eval_interval": "[1, inf)", "eval_tokens": "[1, inf)",
    "checkpoint_interval": "[0, inf)", "keep_checkpoints": "[0, inf)", "log_interval": "[1, inf)",
    "mtp_layers": "[0, inf)", "mtp_loss_weight": "[0, inf)",
}


def _f(default: Any, help: str, **kw: Any):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- model
    preset: str = _f("tiny", "model preset: " + ", ".join(PRESETS) + " (the tokenizer sets vocab_size)")
    model: dict[str, Any] = _f({}, "model config overrides KEY=VALUE (ModelConfig / Hugging Face field names), "
                                   "e.g. --model hidden_size=384 num_hidden_layers=6", metavar="KEY=VALUE")
    # --- data
    data: list[str] = _f([], "text files, folders or globs (.txt, .md, .py, ...) or .jsonl; none = the built-in "
                             "corpus (the Python standard library source)", metavar="PATH")
    text_field: str = _f("text", "field of each .jsonl record that holds the text")
    corpus_limit_mb: float | None = _f(None, "use at most this many MB of text (a deterministic spread of the "
                                             "corpus); none = 4 for the built-in corpus, all of --data")
    val_fraction: float = _f(0.1, "share of the corpus's text held out for validation (whole documents, "
                                  "and the tail of one where they fall short; the tail of each text when there are "
                                  "fewer than 10)")
    tokenizer: str | None = _f(None, "existing tokenizer.json (or a folder with one) instead of training one")
    vocab_size: int = _f(4096, "vocabulary of the trained byte-level BPE (258 = one token per byte)")
    # --- batch and budget
    seq_len: int = _f(256, "tokens per sequence")
    micro_batch: int = _f(8, "sequences per forward/backward")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    steps: int | None = _f(None, "optimizer steps (default 500, unless --tokens is given)")
    tokens: int | None = _f(None, "token budget instead of --steps: steps = tokens / tokens per step")
    # --- optimizer and schedule
    lr: float = _f(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr")
    schedule: str = _f("cosine", "learning-rate schedule after warmup: cosine | wsd (warmup-stable-decay)",
                       choices=SCHEDULES)
    warmup_steps: int = _f(30, "linear warmup steps")
    decay_fraction: float = _f(0.2, "wsd: share of the steps spent in the final linear decay")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only; norms are not decayed)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    dropout: float = _f(0.0, "dropout on the embeddings and on every attention and MLP/MoE output (nanoGPT's "
                             "placement): for small corpora")
    # --- load balance
    aux_loss_alpha: float | None = _f(None, "expert balance loss weight (default: the preset's)")
    aux_loss_scope: str | None = _f(None, "balance loss per sequence or over the micro-batch (default: preset's)",
                                    choices=BALANCE_SCOPES)
    bias_update_gamma: float = _f(1e-3, "aux-loss-free bias step per optimizer step (noaux_tc routing; 0 = off)")
    # --- multi-token prediction (DeepSeek-V3)
    mtp_layers: int | None = _f(None, "MTP modules (num_nextn_predict_layers; default: the preset's): module k "
                                      "also predicts the token k+1 ahead, and later drafts for --speculative mtp")
    mtp_loss_weight: float = _f(0.3, "lambda: the loss adds lambda x the mean MTP cross-entropy (V3: 0.3, "
                                     "then 0.1)")
    mtp_targets: str = _f("tokens", "what MTP module k learns: the text's token k+1 ahead (tokens, V3), or the "
                                    "model's own distribution over it (model: self-distillation, what speculative "
                                    "decoding keeps; for draft heads trained with finetune --freeze main)",
                          choices=MTP_TARGETS)
    # --- execution
    seed: int = _f(0, "seed of the weights and of the batch order")
    paired_init: bool = _f(False, "draw each weight outside the MLP/MoE blocks (embeddings, attention, head) from "
                                  "(seed, its name): runs of different FFN architectures with one seed then start "
                                  "from the same such weights (dsmoe experiment's pairing)")
    device: str = _f("auto", "cuda, cpu or auto")
    dtype: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16 (autocast; weights stay fp32)",
                    choices=DTYPES)
    compile: bool = _f(False, "torch.compile the model")
    compile_scope: str = _f("blocks", "with --compile: compile each block on its own (as under torchrun), or the "
                                      "whole model in one graph (one process only)", choices=COMPILE_SCOPES)
    param_dtype: str = _f("fp32", "fp32: fp32 weights, gradients and AdamW states (16 bytes per parameter; bf16 "
                                  "autocast on CUDA); bf16: all three in bf16 (8 bytes per parameter, no fp32 master "
                                  "copy; the router stays fp32), for models that do not fit otherwise",
                          choices=PARAM_DTYPES)
    activation_checkpointing: bool = _f(False, "recompute each block in backward (less memory, ~30%% more compute)")
    moe_impl: str = _f("auto", "MoE experts implementation", choices=MOE_IMPLS)
    max_skipped_steps: int = _f(5, "abort after this many consecutive steps with a non-finite loss or gradient")
    # --- evaluation, checkpoints, logs
    eval_interval: int = _f(100, "evaluate every N steps (and at the end)")
    eval_tokens: int = _f(16384, "validation tokens per evaluation (the whole split if smaller)")
    checkpoint_interval: int = _f(200, "save a resumable checkpoint every N steps and at the end (0 = never: the "
                                       "final model is still exported)")
    keep_checkpoints: int = _f(2, "keep the last K checkpoints (0 = keep all)")
    log_interval: int = _f(10, "write a metrics.jsonl record every N steps")
    tensorboard: bool = _f(False, "also log to RUN/tensorboard (needs the tensorboard package)")

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values
    def total_steps(self, dp_size: int = 1) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.tokens_per_step() * dp_size)))
        return self.steps if self.steps is not None else 500

    def tokens_per_step(self) -> int:
        """Per data-parallel rank."""
        return self.micro_batch * self.grad_accum * self.seq_len

    def corpus_limit_bytes(self) -> int | None:
        mb = self.corpus_limit_mb if self.corpus_limit_mb is not None else (None if self.data else 4.0)
        return None if mb is None else int(mb * 1e6)

    def model_config(self, vocab_size: int, bos_token_id: int, eos_token_id: int) -> ModelConfig:
        """The preset with the overrides and the tokenizer's vocabulary and special tokens. --model vocab_size may
        pad the vocabulary beyond the tokenizer's (the extra rows are never a target)."""
        base = get_preset(self.preset)
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise UserError(f"--model {unknown[0]}=...: not a ModelConfig field; use Hugging Face config names "
                            "such as hidden_size, num_hidden_layers, n_routed_experts")
        padded = self.model.get("vocab_size")
        if padded is not None and (not isinstance(padded, int) or padded < vocab_size):
            raise UserError(f"--model vocab_size={padded} is below the tokenizer's vocabulary ({vocab_size}): raise it "
                            "or drop it (the tokenizer sets the vocabulary; a larger one pads the embedding)")
        changes = dict(self.model, vocab_size=padded or vocab_size, bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id)
        if self.aux_loss_alpha is not None:
            changes["aux_loss_alpha"] = self.aux_loss_alpha
        if self.aux_loss_scope is not None:
            changes["seq_aux"] = self.aux_loss_scope == "sequence"
        if self.mtp_layers is not None:
            changes["num_nextn_predict_layers"] = self.mtp_layers
        config = base.replace(**changes)
        if self.seq_len > config.max_position_embeddings:
            raise UserError(f"--seq-len {self.seq_len} is beyond the model's max_position_embeddings "
                            f"({config.max_position_embeddings}): lower --seq-len or pass "
                            f"--model max_position_embeddings={self.seq_len}")
        return config

    # ---- validation and JSON
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {getattr(self, name)!r}: {why}")

        check_types(self, fail)
        for name, interval in RANGES.items():
            value = getattr(self, name)
            if value is not None and not _within(value, interval):
                low, high = interval[1:-1].split(", ")
                fail(name, f"must be {'>' if interval[0] == '(' else '>='} {low}" if high == "inf" else
                     f"must be in {interval}")
        if self.steps is not None and self.tokens is not None:
            raise UserError("--steps and --tokens both set: give one budget")
        if self.mtp_layers is not None and self.mtp_layers >= self.seq_len:
            fail("mtp_layers", f"must be below --seq-len={self.seq_len}")
        if self.lr * self.weight_decay >= 1:
            fail("weight_decay", f"each step multiplies the weights by 1 - lr x weight_decay, so it must stay below "
                                 f"1 / lr = {1 / self.lr:g}")
        if self.tokenizer is None and self.vocab_size < MIN_VOCAB:
            fail("vocab_size", f"a byte-level tokenizer needs at least {MIN_VOCAB} (256 bytes + bos/eos)")
        for name, choices in (("schedule", SCHEDULES), ("dtype", DTYPES), ("moe_impl", MOE_IMPLS),
                              ("compile_scope", COMPILE_SCOPES), ("param_dtype", PARAM_DTYPES)):
            if getattr(self, name) not in choices:
                fail(name, f"choose one of {', '.join(choices)}")
        if self.aux_loss_scope is not None and self.aux_loss_scope not in BALANCE_SCOPES:
            fail("aux_loss_scope", f"choose one of {', '.join(BALANCE_SCOPES)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            fail("device", "use auto, cpu, cuda or cuda:N")
        get_preset(self.preset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{source}: unknown training option {unknown[0]!r}; remove it (see dsmoe train --help)")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "train_config.json"
        if not path.is_file():
            raise UserError(f"no training config at {path}: pass RUN/train_config.json of an earlier run")
        return cls.from_dict(read_json(path, "fix it or start from flags"), str(path))

    def differences(self, other: TrainConfig) -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b[k]]


def _within(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(", "))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return above and below
