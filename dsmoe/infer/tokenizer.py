"""The tokenizer of a model folder: tokenizer.json (Hugging Face `tokenizers`) + tokenizer_config.json.

tokenizer_config.json gives bos_token / eos_token (a string or an AddedToken dict), add_bos_token and the
chat_template (a string, or a list of named templates as some hub repos write it); a chat_template.jinja
file beside it wins, as in transformers. Stop ids are the eos of tokenizer_config.json, config.json and
generation_config.json together (DeepSeek chat models list several).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from dsmoe.errors import UserError


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file") from None
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    extra_eos_ids: tuple[int, ...] = ()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"no tokenizer.json in {path}: generation needs the model's tokenizer; copy the "
                            "tokenizer.json (and tokenizer_config.json) of the checkpoint into that folder")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises its own Exception type for a bad file
            raise UserError(f"{file} could not be read as a Hugging Face tokenizers file ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        eos_ids = _ids(_read_json(path / "config.json").get("eos_token_id"))
        eos_ids += _ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        return cls(backend, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")),
                   bool(cfg.get("add_bos_token", False)), template if isinstance(template, str) else None,
                   tuple(eos_ids))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.backend.token_to_id(text)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = [self.token_id(self.eos_token), *self.extra_eos_ids]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids. The tokenizer's own post-processor adds special tokens; add_bos_token (Llama-style
        configs whose tokenizer.json does not) prepends BOS once."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
