"""`--help` of every command: each flag states its default once, and the defaults shown are the real ones."""

import re

import pytest

from dsmoe.bench.cli import BENCHMARKS
from dsmoe.cli import SUBCOMMANDS, main

COMMANDS = [[name] for name in SUBCOMMANDS] + [["experts", action] for action in ("prune", "grow", "upcycle")] + \
    [["bench", name] for name in BENCHMARKS]


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def flag_help(text: str, flag: str) -> str:
    """The help of one flag, on one line."""
    block = next(b for b in re.split(r"\n(?=  -)", text) if b.lstrip().startswith(flag + " ")
                 or b.lstrip().startswith(flag + ","))
    return " ".join(block.split())


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_flag_states_its_default_at_most_once(argv, capsys):
    text = help_text(argv, capsys)
    for block in re.split(r"\n(?=  -)", text):
        assert len(re.findall(r"\(default", block)) <= 1, " ".join(block.split())


def test_defaults_shown_are_the_ones_used(capsys):
    generate = help_text(["generate"], capsys)
    assert "(default: 0.95)" in flag_help(generate, "--top-p")
    assert "(default: 128)" in flag_help(generate, "--max-new-tokens")
    upcycle = help_text(["experts", "upcycle"], capsys)  # the actions' own parsers show defaults too
    assert "(default: 1)" in flag_help(upcycle, "--keep-dense")
    finetune = help_text(["finetune"], capsys)  # fine-tuning's own default, not pretraining's
    assert "(default: 200)" in flag_help(finetune, "--steps") and "500" not in flag_help(finetune, "--steps")
    analyze = help_text(["analyze"], capsys)  # said "none: skip", and `--disable none` is an argparse error
    assert "--disable with no numbers: skip the probe" in flag_help(analyze, "--disable")
    train = help_text(["train"], capsys)
    assert flag_help(train, "--steps").endswith("(default 500, unless --tokens is given)")


def test_top_level_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert "benchmarks: " + " | ".join(BENCHMARKS) in listing


def test_every_flag_says_what_it_does():
    """`dsmoe bench speculative --help` listed --batch-sizes, --prompt-len, --new-tokens, ... with no word."""
    import argparse
    import importlib

    from dsmoe.cli import HelpFormatter

    modules = {name: module for name, (module, _) in SUBCOMMANDS.items() if name != "bench"}
    modules |= {f"bench {name}": f"dsmoe.bench.{name}" for name in BENCHMARKS}
    silent = []

    def walk(name, parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}", sub)
            elif action.option_strings and not action.help:
                silent.append(f"dsmoe {name} {action.option_strings[-1]}")

    for name, module in modules.items():
        parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
        importlib.import_module(module).add_arguments(parser)
        walk(name, parser)
    assert not silent
