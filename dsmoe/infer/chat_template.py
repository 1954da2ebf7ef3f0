"""Chat templates: the model's Jinja template from tokenizer_config.json, rendered in a sandbox.

A template ships with a downloaded checkpoint, so it is untrusted code: it is compiled by jinja2's
ImmutableSandboxedEnvironment (as transformers does), which refuses attribute access to internals such as
`''.__class__.__mro__` and any mutation of the objects passed in. Templates get the variables transformers
gives them (messages, add_generation_prompt, bos_token, eos_token, raise_exception, strftime_now).
Without a template, a plain "Role: content" transcript is used, with "\\nUser:" as a stop string so the
model does not write the user's next turn.
"""

from __future__ import annotations

import functools
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsmoe.errors import UserError

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = ("\nUser:",)


class ChatTemplateError(UserError):
    """The conversation cannot be rendered (the template refused it, or the template itself is broken)."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(messages: list[dict], template: str | None, *, bos_token: str | None = None,
                eos_token: str | None = None, add_generation_prompt: bool = True) -> str:
    """messages [{"role", "content"}, ...] -> the prompt text. Raises ChatTemplateError with the template's
    own message (e.g. "Conversation roles must alternate user/assistant/...")."""
    try:
        compiled = _compile(template or FALLBACK_TEMPLATE)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "")
    except TemplateError as e:  # SecurityError and UndefinedError are TemplateErrors too
        raise ChatTemplateError(f"the chat template could not render this conversation: {e}") from None
    except Exception as e:  # the template is foreign code: whatever it raises is its failure, not ours
        raise ChatTemplateError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from None


def stop_strings_for(template: str | None) -> tuple[str, ...]:
    return () if template else FALLBACK_STOP
