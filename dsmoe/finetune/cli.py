"""`dsmoe finetune BASE --task sft|classify|lm --data TRAIN.jsonl --out DIR`: adapt a pretrained model.

  dsmoe finetune runs/tiny --task classify --data sms_spam_train.jsonl --eval-data sms_spam_test.jsonl
  dsmoe finetune runs/small --task sft --data xquad_en_train.jsonl --field-map qa --lora-rank 16
  dsmoe finetune BASE --task sft --data chats.jsonl --lora-rank 8 --merge      # full hub checkpoint in --out
  dsmoe finetune --resume DIR                                                  # continue exactly

  torchrun --standalone --nproc-per-node 4 -m dsmoe finetune BASE --task sft ... [--ep 2]   # FSDP2 (x EP)

The training flags (--steps, --lr, --micro-batch, --grad-accum, --seq-len, --compile, ...) are dsmoe train's;
under torchrun --micro-batch and --grad-accum are per rank, as for dsmoe train.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dsmoe.distributed import flags as parallel_flags
from dsmoe.errors import UserError
from dsmoe.train.cli import _add_field, explicit_config_values, run_status, start_runtime
from dsmoe.train.config import TrainConfig

# pretraining-only fields: the base decides the model and tokenizer; --data is finetune's own flag
_NOT_FOR_FINETUNE = {"preset", "model", "data", "text_field", "corpus_limit_mb", "val_fraction", "tokenizer",
                     "vocab_size"}
DEFAULTS = {"lr": 1e-3, "steps": 200, "warmup_steps": 10, "eval_interval": 50, "checkpoint_interval": 100,
            "weight_decay": 0.0}
# what the batch shape flags mean here: sft packs examples into rows, classify pads one example per row
HELP = {"steps": "optimizer steps, unless --tokens is given",
        "seq_len": "sft: tokens per packed row (a longer example loses its prompt's start first); classify: the "
                   "longest text kept",
        "micro_batch": "sft: packed rows per forward/backward; classify: examples per forward/backward",
        "mtp_layers": "MTP modules (default: BASE's); more than BASE has adds fresh ones, trained from scratch "
                      "(with --freeze main only they train: a draft head for --speculative mtp); fewer drops some",
        "mtp_targets": "what MTP module k learns: the text's token k+1 ahead (tokens), or the model's own "
                       "distribution over it (model: self-distillation, what speculative decoding keeps; the "
                       "default with --freeze main)"}
# --seq-len when not given: the base's context up to this. Cutting to pretraining's 256 would drop most QA and
# summarisation examples (their targets come last), and packed rows cost nothing for being long.
SEQ_LEN_CAP = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", nargs="?", help="the model to adapt: a dsmoe run folder or a Hugging Face "
                        "DeepSeek checkpoint folder")
    task = parser.add_argument_group("fine-tuning")
    task.add_argument("--task", choices=("sft", "classify", "lm"), help="sft: chat / prompt-completion records, "
                      "loss on the answers; classify: {text, label} records, a classification head; lm: "
                      "continued pretraining on text")
    task.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                      help="training records: one or more .jsonl files (for --task lm whatever dsmoe train reads)")
    task.add_argument("--eval-data", help="held-out records, evaluated every --eval-interval steps")
    task.add_argument("--field-map", nargs="+", action="extend", default=[], metavar="KEY=FIELD",
                      help="build the fields a task reads from others: KEY=FIELD, KEY=TEMPLATE ('{question}' "
                           "placeholders), or a preset: qa, translation, summarization")
    task.add_argument("--out", help="output folder (default: runs/finetune-TASK)")
    task.add_argument("--resume", metavar="DIR", help="continue a fine-tune from its last checkpoint")
    task.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out first")
    task.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    task.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    task.add_argument("--lora-targets", nargs="+", action="extend", default=[],
                      help="attention, mlp (dense layers and shared experts; PEFT cannot load these for DeepSeek), "
                      "experts (routed, per expert), or module names (default: attention experts)")
    task.add_argument("--freeze", nargs="+", action="extend", default=[],
                      choices=("router", "experts", "embeddings", "main"),
                      help="keep these fixed (router: its weights and aux-free bias; main: all but the MTP modules, "
                           "e.g. to train a draft head for --speculative mtp with --mtp-layers 1)")
    task.add_argument("--merge", action="store_true", help="LoRA: also fold the adapter into a full hub "
                      "checkpoint in --out (the adapter goes to --out/adapter)")
    task.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this session")
    task.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop (checkpoint saved) after this long")
    task.add_argument("--no-progress", action="store_true", help="no progress bar")
    parallel_flags.add_arguments(parser, ac_and_compile=False)  # --activation-checkpointing, --compile below
    group = parser.add_argument_group("training (dsmoe train's flags)")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _NOT_FOR_FINETUNE:
            default = DEFAULTS.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
            if f.name == "seq_len":
                default = f"the base's max_position_embeddings, at most {SEQ_LEN_CAP}"
            _add_field(group, f, default, HELP.get(f.name))


def _absolute(path: str) -> str:
    """An existing path as an absolute one: --resume may run from another folder. (Globs stay as given.)"""
    return str(Path(path).resolve()) if Path(path).exists() else path


def resolve(args: argparse.Namespace):
    from dsmoe.finetune.trainer import FinetuneConfig, saved_options

    given = {k: v for k, v in explicit_config_values(args).items() if k not in _NOT_FOR_FINETUNE}
    if args.resume:
        chosen = [flag for flag, value in (("BASE", args.base), ("--task", args.task), ("--data", args.data),
                                           ("--eval-data", args.eval_data), ("--field-map", args.field_map),
                                           ("--lora-rank", args.lora_rank), ("--lora-alpha", args.lora_alpha),
                                           ("--lora-targets", args.lora_targets), ("--freeze", args.freeze),
                                           ("--merge", args.merge)) if value]
        if chosen:
            raise UserError(f"--resume continues with the fine-tuning options the run started with; drop "
                            f"{', '.join(chosen)} (training flags such as --steps may change)")
        out = Path(args.resume)
        ft_values = saved_options(out, "pass the --out folder of a fine-tune to --resume")
        return TrainConfig.from_dict({**TrainConfig.load(out).to_dict(), **given}), FinetuneConfig(**ft_values), \
            out, True
    if not args.base and args.data and len(args.data) > 1:
        raise UserError("no BASE: --data takes every path after it; put BASE before --data")
    if not args.base or not args.task or not args.data:
        raise UserError("give BASE, --task and --data (or --resume DIR)")
    if "seq_len" not in given:
        from dsmoe.checkpoint.hf import read_config

        given["seq_len"] = min(SEQ_LEN_CAP, read_config(Path(args.base))[0].max_position_embeddings)
    if "main" in args.freeze and "mtp_targets" not in given:
        given["mtp_targets"] = "model"  # a draft head learns what the model will accept
    cfg = TrainConfig(**{**DEFAULTS, **given})
    ft = FinetuneConfig(base=_absolute(args.base), task=args.task, data=[_absolute(d) for d in args.data],
                        eval_data=args.eval_data and _absolute(args.eval_data),
                        field_map=args.field_map, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_targets=args.lora_targets, freeze=args.freeze, merge=args.merge)
    return cfg, ft, Path(args.out or f"runs/finetune-{args.task}"), False


def run(args: argparse.Namespace) -> int:
    cfg, ft, out, resume = resolve(args)
    rt = start_runtime(args, cfg.device, "finetune")
    from dsmoe.finetune.lora import adapted_modules
    from dsmoe.finetune.trainer import FinetuneTrainer

    trainer = FinetuneTrainer(cfg, ft, out, resume=resume, overwrite=args.overwrite, progress=not args.no_progress,
                              reducer=rt if rt is not None and rt.world_size > 1 else None)
    summary = trainer.train(stop_after=args.stop_after, time_limit=args.time_limit)
    if rt is not None:
        rt.shutdown()  # only after success: a failing rank exits at once, and torchrun stops the others
    if trainer.main:
        _print_summary(summary, ft, out, adapted_modules(trainer.model))
    return 0


def _print_summary(summary: dict, ft, out: Path, adapted: list[str]) -> None:
    from dsmoe.finetune.lora import DENSE_MLP

    status, speed = run_status(summary, out)
    speed += " (real tokens, padding excluded)" if speed else ""  # a resumed finished run times no tokens
    print(f"{status}: {summary['steps']} steps in {summary['elapsed_s']:.0f}s{speed}")
    if "accuracy" in summary:
        print(f"eval: accuracy {summary['accuracy']:.4f} | macro-F1 {summary['macro_f1']:.4f} | majority class "
              f"{summary['majority_accuracy']:.4f} | {summary['examples']} examples")
    elif "val_loss" in summary:
        print(f"eval: loss {summary['val_loss']:.4f} | perplexity {summary['val_ppl']:.2f}")
    written = "adapter (PEFT layout)" if ft.lora_rank and not ft.merge else "model (hub layout)"
    if ft.lora_rank and not ft.merge and ft.task == "classify":
        written += "; dsmoe evaluates a classifier after --merge (the adapter holds no label names)"
    elif ft.lora_rank and not ft.merge and set(adapted) & set(DENSE_MLP):
        written += "; dsmoe loads it, PEFT cannot: its dense-MLP factors need --merge for transformers"
    print(f"output: {out} ({written}, tokenizer, metrics.jsonl, checkpoints/)")
