"""`dsmoe bench tasks`: examples/s of `dsmoe eval --task` for each task kind, batched (likelihoods sorted by
length and batched, generation through the continuous-batching engine) against the same requests run one
example at a time (--batch-size 1), on the code `dsmoe eval` runs (dsmoe.tasks.suite.predict: the model's
part; the metrics are left out, so sacrebleu and rouge-score need not be installed).

The model is a run folder (--model) or a random one of --preset built in memory, with a byte-level BPE
tokenizer trained on a little of the built-in corpus. The examples are the first --limit of each
built-in task's test file in --data-dir (../shared/data; copy the *_test.jsonl files along to a GPU machine).
Each configuration runs once untimed first (CUDA graph capture, kernel autotuning), then timed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from dsmoe.devices import add_device_argument
from dsmoe.errors import UserError

TASKS = ("rt_polarity", "xquad_en", "ntrex128", "scitldr", "oasst1_en")  # one of each kind / metric


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: random weights of --preset)")
    parser.add_argument("--preset", default="small", help="preset for the random model")
    parser.add_argument("--data-dir", default=os.environ.get("DSMOE_SHARED_DATA", "../shared/data"),
                        help="folder with the built-in tasks' *_test.jsonl files")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated built-in tasks")
    parser.add_argument("--limit", type=int, default=32, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=32, help="batched run: sequences per forward / slots")
    add_device_argument(parser)
    parser.add_argument("--json", help="write the table's numbers to this JSON file")


def random_model(preset: str, folder: Path, device, vocab_size: int = 4096):
    """-> (a model of `preset` with random weights built on `device`, bf16 on a GPU; a byte-level BPE tokenizer
    trained on 1 MB of the built-in corpus and saved in `folder`). The vocabulary is cut to the tokenizer's."""
    import torch

    from dsmoe.presets import get_preset
    from dsmoe.data.sources import builtin_corpus
    from dsmoe.data.tokenizer import train_tokenizer
    from dsmoe.model.transformer import build_model

    texts, size = [], 0
    for doc in builtin_corpus():
        texts.append(doc.text)
        size += len(doc.text)
        if size > 1_000_000:
            break
    trained = train_tokenizer(texts, vocab_size)
    config = get_preset(preset).replace(vocab_size=trained.vocab_size, bos_token_id=trained.bos_id,
                                        eos_token_id=trained.eos_id)
    trained.save(folder, config.max_position_embeddings)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return build_model(config, device=device, dtype=dtype).eval(), trained


def random_model_folder(preset: str, folder: Path, device) -> Path:
    """random_model written as a model folder (for loaders that need files, such as lm-eval's hf model)."""
    from dsmoe.checkpoint.hf import save_pretrained

    model, _ = random_model(preset, folder, device)
    save_pretrained(model, folder)
    return folder


def run(args: argparse.Namespace) -> int:
    from dsmoe.tasks.eval_tasks import timed
    from dsmoe.tasks.specs import get_task, read_examples
    from dsmoe.tasks.suite import TaskRun, predict

    if args.limit < 1 or args.batch_size < 2:
        raise UserError("--limit must be at least 1 and --batch-size at least 2 (the batched run is compared with "
                        "one example at a time)")
    data = Path(args.data_dir)
    tasks = [t for t in args.tasks.split(",") if t]
    missing = [t for t in tasks if not (data / f"{t}_test.jsonl").is_file()]
    if missing:
        raise UserError(f"no {', '.join(t + '_test.jsonl' for t in missing)} in {data}: pass --data-dir (the "
                        "shared data folder) or set DSMOE_SHARED_DATA")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from dsmoe.infer.loading import load_for_inference

            model, tokenizer, device = load_for_inference(argparse.Namespace(
                path=args.model, device=args.device, dtype="auto", moe_impl="auto", quantize=None), classifier_ok=True)
        else:
            from dsmoe.devices import resolve_device

            device = resolve_device(args.device)
            model, tokenizer = random_model(args.preset, Path(tmp), device)
        rows = []
        for name in tasks:
            spec = get_task(name)
            examples = read_examples(data / f"{name}_test.jsonl", spec, args.limit)
            run_ = TaskRun(model, tokenizer)
            speeds = {}
            for batch_size in (args.batch_size, 1):
                run_.batch_size = batch_size
                predict(spec, examples[: max(2, batch_size // 4)], run_)  # warm-up: graphs, autotuning
                seconds, _ = timed(device, lambda: predict(spec, examples, run_))
                speeds[batch_size] = len(examples) / seconds
            rows.append({"task": name, "kind": spec.kind, "metric": spec.metric, "examples": len(examples),
                         "batched": speeds[args.batch_size], "one_at_a_time": speeds[1],
                         "speedup": speeds[args.batch_size] / speeds[1]})
            print(f"{name}: {rows[-1]['batched']:.1f} examples/s batched, {rows[-1]['one_at_a_time']:.1f} one at a "
                  "time", flush=True)
    print(f"\n{'task':<12} {'kind':<15} {'metric':<15} {'examples':>8} {'batched/s':>10} {'one-at-a-time/s':>16} "
          f"{'speed-up':>9}")
    for r in rows:
        print(f"{r['task']:<12} {r['kind']:<15} {r['metric']:<15} {r['examples']:>8} {r['batched']:>10.1f} "
              f"{r['one_at_a_time']:>16.1f} {r['speedup']:>8.1f}x")
    if args.json:
        from dsmoe.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"device": str(device), "preset": args.preset, "model":
                                                       args.model, "batch_size": args.batch_size, "rows": rows,
                                                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                                      indent=2) + "\n")
    return 0
