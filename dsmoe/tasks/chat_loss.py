"""Chat conversations as score requests over their assistant tokens only: the conversation is rendered with
the model's chat template (or the plain fallback), exactly as `dsmoe chat` renders it, and a token counts
when it starts inside an assistant turn's text (its content and the end-of-turn text the template writes
after it, which the model must learn to produce too)."""

from __future__ import annotations

from dsmoe.errors import UserError
from dsmoe.infer.chat_template import render_chat
from dsmoe.tasks.scoring import ScoreRequest


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return render_chat(messages, tokenizer.chat_template, bos_token=tokenizer.bos_token,
                       eos_token=tokenizer.eos_token, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """-> (the rendered conversation, [start, end) character spans of its assistant turns)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise UserError("a chat example's messages must be a list of {\"role\", \"content\"} objects")
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError("the chat template does not render a conversation as a prefix of its longer "
                            "continuation, so assistant turns cannot be located in it")
        spans.append((len(before), len(through)))
    return text, spans


def assistant_request(tokenizer, messages: list[dict], max_len: int) -> ScoreRequest | None:
    """The conversation's tokens (its first max_len) with only assistant tokens scored; None when none are."""
    text, spans = assistant_spans(tokenizer, messages)
    add_special = tokenizer.chat_template is None  # a template writes its own special tokens (as `dsmoe chat`)
    ids = tokenizer.encode(text, add_special_tokens=add_special)
    offsets = tokenizer.backend.encode(text, add_special_tokens=add_special).offsets
    offsets = [(0, 0)] * (len(ids) - len(offsets)) + list(offsets)  # a BOS the wrapper prepends has no text
    ids, offsets = ids[:max_len], offsets[:max_len]
    mask = tuple(any(lo <= start < hi for lo, hi in spans) and end > start for start, end in offsets[1:])
    if len(ids) < 2 or not any(mask):
        return None
    return ScoreRequest(ids, 1, mask)
