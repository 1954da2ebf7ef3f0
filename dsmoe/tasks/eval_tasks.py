"""`dsmoe eval MODEL --task NAME --data FILE.jsonl` (a task suite) and `dsmoe eval MODEL --lm-eval TASKS`
(lm-evaluation-harness in process): load the folder once, run, print a table, write results.json (plus
predictions.jsonl and, for classification, confusion.json/png) into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dsmoe.atomic import atomic_write_text
from dsmoe.errors import UserError


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("task suites (--task) and lm-evaluation-harness (--lm-eval)")
    group.add_argument("--task", help="built-in task (rt_polarity, dbpedia14, sms_spam, xquad_en, ntrex128, scitldr, "
                       "oasst1_en) or a task spec .json file; --data is then one .jsonl file of examples")
    group.add_argument("--shots", type=int, default=0, help="few-shot examples put before each prompt")
    group.add_argument("--shots-from", metavar="TRAIN.jsonl", help="file the few-shot examples are drawn from "
                       "(the same ones every run)")
    group.add_argument("--limit", type=int, help="evaluate the first N examples only")
    group.add_argument("--out", metavar="DIR", help="folder for results.json, predictions.jsonl and the confusion "
                       "matrix (default: eval/<task>)")
    group.add_argument("--bench", action="store_true", help="also run one example at a time (--batch-size 1) and "
                       "print examples/s of both and the speed-up")
    group.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness task names, run "
                       "in process with the `dsmoe` lm-eval model")
    group.add_argument("--include-path", metavar="DIR", help="folder of extra lm-eval task YAML files")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto = bfloat16 on a GPU, float32 on the CPU")
    group.add_argument("--no-cuda-graphs", action="store_true", help="generate with eager decode steps")


def _load(args: argparse.Namespace):
    from dsmoe.infer.loading import load_for_inference

    return load_for_inference(args, classifier_ok=True)  # a fine-tuned head classifies


def fine_tuned_text_tokens(folder) -> int | None:
    """The --seq-len at which `dsmoe finetune --task classify` cut each text (the run's train_config.json); None for
    a folder that no dsmoe fine-tune wrote."""
    if not (Path(folder) / "train_config.json").is_file():
        return None
    from dsmoe.train.config import TrainConfig

    return TrainConfig.load(folder).seq_len


def run_suite(args: argparse.Namespace) -> int:
    from dsmoe.tasks.specs import draw_shots, few_shot_prefix, get_task, read_examples
    from dsmoe.model.classifier import SequenceClassifier
    from dsmoe.tasks.suite import TaskRun, check_head_labels, predict, score

    spec = get_task(args.task)
    if not args.data or len(args.data) != 1:
        raise UserError(f"--task {spec.name} reads one .jsonl file of examples: pass --data FILE.jsonl")
    if args.shots < 0 or (args.limit is not None and args.limit < 1):
        raise UserError("--shots must be >= 0 and --limit >= 1")
    if args.shots and not args.shots_from:
        raise UserError("--shots K needs --shots-from TRAIN.jsonl to draw the examples from")
    if args.shots and spec.kind == "chat":
        raise UserError(f"task {spec.name} scores whole conversations: it takes no --shots")
    examples = read_examples(args.data[0], spec, args.limit)
    prefix = few_shot_prefix(spec, draw_shots(read_examples(args.shots_from, spec), args.shots)) if args.shots else ""
    out = Path(args.out or Path("eval") / spec.name)
    model, tokenizer, device = _load(args)
    if spec.kind == "classification" and isinstance(model, SequenceClassifier):
        check_head_labels(spec, model.labels)  # before any compute
    run = TaskRun(model, tokenizer, batch_size=args.batch_size, prefix=prefix, cuda_graphs=not args.no_cuda_graphs)
    if isinstance(model, SequenceClassifier) and (trained := fine_tuned_text_tokens(args.path)):
        run.max_len = min(run.max_len, trained)  # a text the head never saw whole is read as training cut it
        print(f"the head reads each text's first {run.max_len} tokens, as its fine-tune did (--seq-len {trained})")

    seconds, predicted = timed(device, lambda: predict(spec, examples, run))
    result, rows = score(spec, examples, predicted)
    summary = {"task": spec.name, "kind": spec.kind, "metric": spec.metric, "model": str(args.path),
               "data": str(args.data[0]), "examples": len(examples), "shots": args.shots,
               "batch_size": args.batch_size, "model_seconds": seconds, "examples_per_second": len(examples) / seconds,
               "metrics": result}
    if args.bench:
        run.batch_size = 1
        one_seconds, _ = timed(device, lambda: predict(spec, examples, run))
        summary["one_at_a_time"] = {"model_seconds": one_seconds, "examples_per_second": len(examples) / one_seconds,
                                    "speedup": one_seconds / seconds}
    write_results(out, spec, summary, rows)
    print_table(summary, out)
    return 0


def timed(device, fn):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, value


def write_results(out: Path, spec, summary: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    confusion = summary["metrics"].get("confusion_matrix")
    if confusion is not None:
        from dsmoe.tasks.metrics import plot_confusion

        atomic_write_text(out / "confusion.json", json.dumps(confusion, indent=2) + "\n")
        plot_confusion(confusion, out / "confusion.png", f"{spec.name}: {summary['model']}")
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def _flat(metrics: dict, prefix: str = ""):
    for key, value in metrics.items():
        if key in ("confusion_matrix", "per_label"):
            continue
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key} ")
        else:
            yield prefix + key, value


def print_table(summary: dict, out: Path) -> None:
    rows = list(_flat(summary["metrics"]))
    rows.append(("examples/s", summary["examples_per_second"]))
    if "one_at_a_time" in summary:
        rows.append(("examples/s one at a time", summary["one_at_a_time"]["examples_per_second"]))
        rows.append(("speed-up of batching", summary["one_at_a_time"]["speedup"]))
    width = max(len(name) for name, _ in rows)
    print(f"{summary['task']} ({summary['kind']}, {summary['examples']} examples, {summary['shots']}-shot) "
          f"on {summary['model']}")
    for name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {name:<{width}}  {shown}")
    print(f"results: {out / 'results.json'}")


def run_lm_eval(args: argparse.Namespace) -> int:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'dsmoe[eval]'") from None
    from dsmoe.tasks.lm_eval_model import DsmoeLM

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; `lm-eval ls tasks` lists the known ones "
                        "(add your own YAML folder with --include-path)")
    lm = DsmoeLM(str(args.path), device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                 moe_impl=args.moe_impl, cuda_graphs=not args.no_cuda_graphs, quantize=args.quantize)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                              num_fewshot=args.shots or None)
    from lm_eval.utils import make_table

    print(make_table(results))
    out = Path(args.out or Path("eval") / "lm_eval")
    out.mkdir(parents=True, exist_ok=True)
    keep = {k: results[k] for k in ("results", "versions", "n-shot", "configs") if k in results}
    atomic_write_text(out / "results.json", json.dumps(keep, indent=2, default=str) + "\n")
    print(f"results: {out / 'results.json'}")
    return 0
