"""From token ids to streamed text: incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character split over tokens) and for
SentencePiece-style decoders (a token's leading space depends on what precedes it), so new text is the
difference between decoding a short window of ids with and without the new ones (the prefix/read offset
scheme of TGI and vLLM); text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until the rest
arrives. Stop strings are found across token boundaries; text that could be the start of a stop string is
held back, so a stream never shows part of one.
"""

from __future__ import annotations

from collections.abc import Iterator

from dsmoe.data.tokenizer import Tokenizer
from dsmoe.infer.engine import Engine, StepOutput
from dsmoe.infer.sampling import SamplingParams

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new one, for the right leading space


class IncrementalDecoder:
    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_ids: list[int]) -> str:
        self.ids += token_ids
        before = self.tokenizer.decode(self.ids[self.prefix: self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character shows as U+FFFD), at the end of a stream."""
        before = self.tokenizer.decode(self.ids[self.prefix: self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopStrings:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to show, whether a stop string ended the output). The stop string itself and
        everything after it are dropped."""
        if not self.stops:
            return text, False
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = 0  # longest tail of the held text that a stop string starts with
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:n]):
                    keep = n
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class TextStream:
    """Token outputs of one request -> text deltas, with stop strings applied."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | tuple[str, ...] = ()):
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stops = StopStrings(stop)
        self.stopped = False

    def push(self, token_ids: list[int], final: bool = False) -> str:
        """New ids -> new text. `final` (the request finished) releases whatever was held back."""
        if self.stopped:
            return ""
        text, self.stopped = self.stops.push(self.decoder.push(token_ids))
        if final and not self.stopped:
            more, self.stopped = self.stops.push(self.decoder.flush())
            text += more + ("" if self.stopped else self.stops.flush())
        return text


def stream_text(engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                stop: list[str] | tuple[str, ...] = ()) -> Iterator[tuple[str, StepOutput]]:
    """Run one request to the end on an otherwise idle engine, yielding (new text, output) per step.
    A stop string cancels the request; its output then carries finish_reason "stop"."""
    rid = engine.add_request(prompt_ids, params)
    text = TextStream(tokenizer, prompt_ids, stop)
    while engine.has_work():
        for out in engine.step():
            if out.request_id != rid:
                continue
            delta = text.push(out.token_ids, final=out.finish_reason is not None)
            if text.stopped and out.finish_reason is None:
                engine.cancel(rid)
                out.finish_reason = "stop"
            yield delta, out
            if out.finish_reason:
                return
