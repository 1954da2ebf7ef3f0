"""`dsmoe chat PATH`: a chat REPL with history, through the model's chat template (or a plain fallback).

Type a message and press Enter; /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply.
When the conversation outgrows --max-model-len, the oldest turns (after the system message) are dropped.
"""

from __future__ import annotations

import argparse
import sys

from dsmoe.infer.loading import (add_model_arguments, add_sampling_arguments, check_at_least_one, eos_ids,
                                 load_for_inference, speculative_options)

HELP = "/reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system message that starts the conversation")
    add_sampling_arguments(parser, temperature=0.7, max_new_tokens=512)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="conversation length in tokens (default: min(4096, the model's maximum))")


def run(args: argparse.Namespace) -> int:
    from dsmoe.infer.engine import Engine

    check_at_least_one(args, ("max_model_len",))
    model, tokenizer, _ = load_for_inference(args)
    engine = Engine(model, max_batch=1, max_model_len=args.max_model_len, eos_token_ids=eos_ids(model, tokenizer),
                    cuda_graphs=not args.no_cuda_graphs, compile=args.compile, **speculative_options(args))
    chat = Chat(engine, tokenizer, args)
    interactive = sys.stdin.isatty()
    template = "the model's chat template" if tokenizer.chat_template else "a plain 'Role: text' template"
    print(f"chatting with {args.path} ({template}); {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset()
            print("(history cleared)")
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}")
            continue
        chat.reply(line)
    return 0


class Chat:
    def __init__(self, engine, tokenizer, args: argparse.Namespace):
        self.engine, self.tokenizer, self.args = engine, tokenizer, args
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.turns: list[dict] = []
        self.count = 0

    def reset(self) -> None:
        self.turns = []

    def prompt_ids(self) -> list[int] | None:
        """The rendered conversation, dropping the oldest turns until a reply of some length fits."""
        from dsmoe.infer.chat_template import render_chat

        tok = self.tokenizer
        while self.turns:
            text = render_chat(self.system + self.turns, tok.chat_template, bos_token=tok.bos_token,
                               eos_token=tok.eos_token)
            ids = tok.encode(text, add_special_tokens=tok.chat_template is None)
            if len(ids) < self.engine.max_model_len - min(self.args.max_new_tokens, 16):
                return ids
            self.turns = self.turns[2:] if len(self.turns) > 1 else []
        return None

    def reply(self, message: str) -> str:
        from dsmoe.infer.chat_template import stop_strings_for
        from dsmoe.infer.sampling import SamplingParams
        from dsmoe.infer.text import stream_text

        self.turns.append({"role": "user", "content": message})
        ids = self.prompt_ids()
        if ids is None:
            print(f"(that message does not fit in {self.engine.max_model_len} tokens; send a shorter one)")
            return ""
        a = self.args
        seed = None if a.seed is None else a.seed + self.count
        self.count += 1
        params = SamplingParams(max_new_tokens=min(a.max_new_tokens, self.engine.max_model_len - len(ids)),
                                temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                repetition_penalty=a.repetition_penalty, seed=seed)
        stops = list(a.stop) + list(stop_strings_for(self.tokenizer.chat_template))
        print("assistant> ", end="", flush=True)
        pieces = []
        try:
            for delta, _ in stream_text(self.engine, self.tokenizer, ids, params, stops):
                pieces.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            self.engine.abort_all()
            print(" (stopped)", end="")
        print()
        reply = "".join(pieces).strip()
        self.turns.append({"role": "assistant", "content": reply})
        return reply
