"""`dsmoe eval RUN [--data FILE ...]`: validation loss and perplexity of a run, a training checkpoint
(RUN/checkpoints/step_N) or a Hugging Face checkpoint folder. With --task or --lm-eval it scores a task suite
instead (eval_tasks.py).

Without --data it re-creates the run's own validation split from RUN/train_config.json (from the token
cache: instant) and scores the same windows as the trainer's evaluations, so the number matches the run's
last "val loss" line. With --data it scores the whole of the given text.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dsmoe.devices import add_device_argument, add_moe_impl_argument
from dsmoe.errors import UserError
from dsmoe.infer.loading import add_quantize_argument
from dsmoe.tasks.eval_tasks import add_task_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN", help="run folder, RUN/checkpoints/step_N, or a Hugging Face "
                        "checkpoint folder")
    parser.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                        help="text files, folders, globs or .jsonl to score (default: the run's validation split)")
    parser.add_argument("--text-field", default="text", help="field of each .jsonl record that holds the text")
    parser.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the one in RUN)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: the run's, else 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows (with --task: sequences or engine slots) "
                        "per forward; 1 = one at a time")
    parser.add_argument("--max-tokens", type=int, help="score at most this many tokens (default: the run's "
                        "--eval-tokens for its validation split, all of --data)")
    add_device_argument(parser)
    add_moe_impl_argument(parser)
    add_quantize_argument(parser)
    add_task_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.task or args.lm_eval:
        from dsmoe.tasks.eval_tasks import run_lm_eval, run_suite

        if args.task and args.lm_eval:
            raise UserError("pass --task or --lm-eval, not both")
        return run_suite(args) if args.task else run_lm_eval(args)
    import torch

    from dsmoe.checkpoint.hf import load_pretrained
    from dsmoe.checkpoint.training import load_model
    from dsmoe.data.batches import eval_windows
    from dsmoe.data.prepare import prepare_corpus, read_documents
    from dsmoe.data.tokenizer import load_tokenizer
    from dsmoe.devices import resolve_device
    from dsmoe.tasks.perplexity import evaluate_loss, perplexity
    from dsmoe.train.config import TrainConfig

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: pass a run folder, RUN/checkpoints/step_N or a checkpoint folder")
    is_training_checkpoint = (path / "state.json").is_file()
    run_dir = path.parent.parent if is_training_checkpoint else path
    train_cfg = TrainConfig.load(run_dir) if (run_dir / "train_config.json").is_file() else None
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        raise UserError("--batch-size and --seq-len must be at least 1")

    device = resolve_device(args.device)
    if is_training_checkpoint:
        model = load_model(path, device, args.moe_impl)
    else:
        # quantized weights run with bf16 activations on a GPU (their kernels' format), fp32 elsewhere
        dtype = torch.bfloat16 if args.quantize and device.type == "cuda" else torch.float32
        model = load_pretrained(path, dtype=dtype, device=device, moe_impl=args.moe_impl, quantize=args.quantize)
    tokenizer = load_tokenizer(args.tokenizer or run_dir)
    seq_len = args.seq_len or (train_cfg.seq_len if train_cfg else min(1024, model.config.max_position_embeddings))
    if seq_len > model.config.max_position_embeddings:
        raise UserError(f"--seq-len {seq_len} is beyond the model's max_position_embeddings "
                        f"({model.config.max_position_embeddings}); lower --seq-len")

    if args.data:
        docs = read_documents(args.data, args.text_field)
        tokens = tokenizer.encode_stream([d.text for d in docs])
        tokens_per_byte = len(tokens) / max(sum(len(d.text.encode()) for d in docs), 1)
        max_tokens, source = args.max_tokens, " ".join(args.data)
    elif train_cfg is not None:
        docs = read_documents(train_cfg.data, train_cfg.text_field, train_cfg.corpus_limit_bytes())
        shards = prepare_corpus(docs, val_fraction=train_cfg.val_fraction, tokenizer_path=str(run_dir)).shards
        tokens, tokens_per_byte = shards.val, shards.val_tokens_per_byte
        max_tokens, source = args.max_tokens or train_cfg.eval_tokens, "validation split"
    else:
        raise UserError(f"{run_dir} has no train_config.json to find a validation split in: pass --data FILE")
    windows = eval_windows(tokens, seq_len, max_tokens)
    if not windows:
        raise UserError(f"{source} has fewer than 2 tokens to score; pass more text with --data")
    if max(int(w.max()) for w in windows) >= model.config.vocab_size:
        raise UserError(f"the tokenizer's ids exceed the model's vocabulary ({model.config.vocab_size}): the "
                        "tokenizer belongs to another model; pass the right one with --tokenizer")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    loss, n = evaluate_loss(model, windows, batch_size=args.batch_size, device=device, autocast_dtype=autocast)
    if not math.isfinite(loss):
        raise UserError(f"{path} scores a loss of {loss} on {source}: its weights hold NaN or inf "
                        "(a run that diverged, or a bad --lr); evaluate an earlier checkpoint, RUN/checkpoints/step_N")
    print(f"{source}: loss {loss:.4f} | perplexity {perplexity(loss):.2f} | {loss * tokens_per_byte:.4f} nats/byte "
          f"| {n:,} tokens in windows of {seq_len}")
    return 0
