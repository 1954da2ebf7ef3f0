"""`dsmoe experiment NAME [--scale cpu|gpu]`: train every row of an experiment (dsmoe.analysis.experiments), then
write one table and one plot of the loss curves.

  dsmoe experiment architectures --scale cpu                  # minutes on 2 CPU cores, the built-in corpus
  dsmoe experiment balancing --scale gpu --data wiki.jsonl.xz --parallel 4 --out runs/balancing
  dsmoe experiment architectures --dry-run                    # print the rows' `dsmoe train` commands only

OUT/configs/ROW.json is each row's train_config.json and OUT/commands.sh runs any row alone with `dsmoe train`;
OUT/runs/ROW is its run folder. The results go to OUT/results.json, OUT/table.md and OUT/loss.png.
`--analyze FILE ...` then runs `dsmoe analyze` on the seed's MoE models over those files (one domain each) and
adds their redundancy probe and specialisation to the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsmoe.devices import add_device_argument, add_moe_impl_argument
from dsmoe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsmoe.analysis.experiments import EXPERIMENTS, SCALES

    parser.add_argument("name", choices=EXPERIMENTS, help="the experiment")
    parser.add_argument("--scale", default="cpu", choices=SCALES, help="model size and token budget")
    parser.add_argument("--data", nargs="*", default=[], metavar="PATH", help="training corpus (default: the "
                        "built-in corpus); for --scale gpu e.g. pretrain_enwiki_train_00.jsonl.xz")
    parser.add_argument("--text-field", default="text", help="field of each .jsonl record that holds the text")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (each one pairs the arms)")
    parser.add_argument("--arms", nargs="+", help="run only these arms (default: all)")
    parser.add_argument("--steps", type=int, help="override the scale's optimizer steps: fewer for a quick look, "
                        "more for a larger budget (the corpus read grows with them)")
    parser.add_argument("--out", help="output folder (default: runs/experiment-NAME-SCALE)")
    parser.add_argument("--parallel", type=int, default=1, help="rows trained at once (small models leave a GPU "
                        "mostly idle)")
    parser.add_argument("--analyze", nargs="+", metavar="PATH", help="afterwards analyze the MoE models of the "
                        "first seed on these files (one domain each)")
    parser.add_argument("--analyze-tokens", type=int, default=65536, help="tokens the analysis scores")
    add_device_argument(parser)
    add_moe_impl_argument(parser)
    parser.add_argument("--cache-dir", help="token and tokenizer cache (default: $DSMOE_CACHE or ~/.cache/dsmoe)")
    parser.add_argument("--dry-run", action="store_true", help="write and print the rows' configs, train nothing")


def train_command(config_file: Path, run_dir: Path, cache_dir: str | None) -> list[str]:
    command = ["dsmoe", "train", "--config", str(config_file), "--out", str(run_dir), "--overwrite"]
    return command + (["--cache-dir", cache_dir] if cache_dir else [])


def train_rows(rows, out: Path, parallel: int, cache_dir: str | None) -> None:
    """Each row is exactly its printed command, `dsmoe train --config ...`, run as its own process, `parallel` at
    a time; a row whose run folder already holds the final model is not trained again."""
    from dsmoe.train.config import TrainConfig

    def done(row) -> bool:
        run = out / "runs" / row.name
        return (run / "model.safetensors").is_file() and TrainConfig.load(run) == row.config

    pending = [r for r in rows if not done(r)]

    def launch(row) -> tuple[str, int]:
        command = [sys.executable, "-m", *train_command(out / "configs" / f"{row.name}.json", out / "runs" / row.name,
                                                        cache_dir), "--no-progress"]
        with open(out / "logs" / f"{row.name}.log", "w") as log:
            return row.name, subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode

    (out / "logs").mkdir(exist_ok=True)
    with ThreadPoolExecutor(parallel) as pool:
        for name, code in pool.map(launch, pending):
            print(f"== {name}: {'trained' if code == 0 else f'FAILED (exit {code})'}", flush=True)
            if code != 0:
                tail = "\n".join((out / "logs" / f"{name}.log").read_text().splitlines()[-15:])
                raise UserError(f"row {name} failed; the end of its log ({out}/logs/{name}.log):\n{tail}")


def run(args: argparse.Namespace) -> int:
    from dsmoe.analysis.experiments import experiment_rows

    if args.parallel < 1 or (args.steps is not None and args.steps < 1):
        raise UserError("--parallel and --steps must be at least 1")
    rows = experiment_rows(args.name, args.scale, data=args.data, seeds=args.seeds, only=args.arms,
                           steps=args.steps, text_field=args.text_field, device=args.device, moe_impl=args.moe_impl)
    out = Path(args.out or f"runs/experiment-{args.name}-{args.scale}")
    from dsmoe.atomic import atomic_write_text

    (out / "configs").mkdir(parents=True, exist_ok=True)
    commands = []
    for row in rows:
        file = out / "configs" / f"{row.name}.json"
        atomic_write_text(file, json.dumps(row.config.to_dict(), indent=2) + "\n")
        commands.append(shlex.join(train_command(file, out / "runs" / row.name, args.cache_dir)))
    atomic_write_text(out / "commands.sh", "# each line trains one row alone\n" + "\n".join(commands) + "\n")
    print(f"{args.name} at --scale {args.scale}: {len(rows)} rows (arms x seeds), each an ordinary dsmoe train:")
    print("\n".join(commands))
    if args.dry_run:
        return 0

    from dsmoe.analysis.experiment_report import compare_analyses, summarise, write_results
    from dsmoe.data.prepare import prepare_corpus, read_documents

    for spec in args.analyze or []:  # a bad path is found now, not after every row has trained
        read_documents([spec], args.text_field)
    cfg = rows[0].config
    start = time.perf_counter()
    docs = read_documents(cfg.data, cfg.text_field, cfg.corpus_limit_bytes())
    # once, before the rows: they then find the tokenizer and the token shards in the cache
    corpus = prepare_corpus(docs, val_fraction=cfg.val_fraction, vocab_size=cfg.vocab_size,
                            cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    prepared_s = time.perf_counter() - start
    train_rows(rows, out, args.parallel, args.cache_dir)
    results = summarise(rows, out, corpus.shards.meta)
    results["seconds"] = {"data": round(prepared_s, 1), "total": round(time.perf_counter() - start, 1)}
    results["parallel"] = args.parallel
    if args.analyze:
        write_results(results, args.name, out)  # the trained rows' results stand even if the analysis fails
        results["analysis"] = compare_analyses(rows, out, args.analyze, args.text_field, args.analyze_tokens,
                                               args.device)
    write_results(results, args.name, out)
    print((out / "table.md").read_text(), end="")
    print(f"written: {out}/results.json, table.md, loss.png")
    return 0
