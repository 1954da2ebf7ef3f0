"""`dsmoe` command line: one subcommand per job, each a thin layer over library functions.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules
are imported only when their subcommand runs, so `dsmoe --help` stays fast and a missing optional
extra (say [serve]) only matters to the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dsmoe.bench.cli import BENCHMARKS  # the names only: each benchmark's module loads when it runs
from dsmoe.errors import UserError

SUBCOMMANDS = {
    "train": ("dsmoe.train.cli", "train a model (built-in corpus by default), or resume a run"),
    "finetune": ("dsmoe.finetune.cli", "fine-tune a pretrained model: chat/instruction SFT, classification, LoRA"),
    "eval": ("dsmoe.tasks.eval_cli", "loss and perplexity on text, task suites (--task), lm-eval tasks (--lm-eval)"),
    "analyze": ("dsmoe.analysis.analyze", "expert statistics of a model on text: load, specialisation, redundancy"),
    "experiment": ("dsmoe.analysis.experiment_cli",
                   "reproduce a DeepSeekMoE claim: train paired configs, table + plot"),
    "generate": ("dsmoe.infer.cli", "generate text from a prompt"),
    "chat": ("dsmoe.infer.chat_cli", "interactive chat with a model (REPL with history)"),
    "serve": ("dsmoe.serve.cli", "OpenAI-compatible HTTP server"),
    "convert": ("dsmoe.checkpoint.convert_cli", "re-save a checkpoint (dtype, shard size) in the hub layout"),
    "experts": ("dsmoe.surgery.cli", "change a model's experts: prune | grow | upcycle"),
    "bench": ("dsmoe.bench.cli", "benchmarks: " + " | ".join(BENCHMARKS)),
}


def names_its_default(help_text: str | None) -> bool:
    """Whether a flag's help already says what its default is ("(default: ...)", "(default 500, unless ...)")."""
    return bool(help_text) and ("(default" in help_text or "default:" in help_text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help already names it (a None default would read "None")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if names_its_default(action.help) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsmoe", description="DeepSeekMoE models: train, evaluate, generate, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    top, rest = parser.parse_known_args(argv)
    if top.command is None:
        parser.print_help()
        return 2
    module_name, help_text = SUBCOMMANDS[top.command]
    logging.basicConfig(level=logging.DEBUG if top.verbose else logging.INFO, format="%(message)s")
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"dsmoe {top.command}", description=help_text, formatter_class=HelpFormatter)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
