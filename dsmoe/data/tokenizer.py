"""The one tokenizer wrapper, for training and serving: a Hugging Face `tokenizers` tokenizer.json plus the
special-token facts of tokenizer_config.json.

Training: `train_tokenizer` builds a byte-level BPE that starts with the two special tokens `<|bos|>` (id 0) and
`<|eos|>` (id 1), then the 256 byte symbols, then the merges: `--vocab-size 258` is a pure byte-level model (one
token per byte, so its loss per token is a loss per byte). Every document is encoded as `<|bos|> text <|eos|>`
(`encode_documents`). A run folder holds `tokenizer.json` and `tokenizer_config.json` (bos/eos names and
add_bos_token, which transformers' `PreTrainedTokenizerFast` reads too).

Serving: `encode` adds special tokens the way transformers does (the tokenizer's own post-processor; with
add_bos_token, Llama-style configs whose tokenizer.json does not, BOS once). tokenizer_config.json may carry a
chat_template (a string, or a list of named templates as some hub repos write it); a chat_template.jinja file
beside it wins, as in transformers. Stop ids (`eos_ids`) are the eos of tokenizer_config.json, config.json and
generation_config.json together (DeepSeek chat models list several).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dsmoe.atomic import atomic_copy, atomic_write_text
from dsmoe.errors import UserError
from dsmoe.json_files import read_json

BOS, EOS = "<|bos|>", "<|eos|>"
MIN_VOCAB = 256 + 2  # the byte alphabet plus bos/eos
# What a model folder holds for its tokenizer besides config.json: the files `Tokenizer.load` reads (the
# template, the end-of-sequence ids of generation_config.json) and special_tokens_map.json, which transformers reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """The tokenizer files `source` has, copied into the folder `target` (each atomically)."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            atomic_copy(Path(source) / name, Path(target) / name)


# Names other tokenizers use, tried in order when no tokenizer_config.json names them.
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|startoftext|>")
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|im_end|>")


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    extra_eos_ids: tuple[int, ...] = ()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """A tokenizer.json file, or a folder holding one (and maybe tokenizer_config.json, chat_template.jinja,
        config.json and generation_config.json)."""
        path = Path(path).expanduser()
        if not path.exists():  # a mistyped model folder: say so, not "copy a tokenizer.json there"
            raise UserError(f"no tokenizer.json at {path}: no such file or folder; check the path")
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer.json at {path}: pass a tokenizer.json file or a folder that holds one (copy "
                            "the checkpoint's tokenizer.json and tokenizer_config.json there)")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception subclasses for any parse error
            raise UserError(f"{file} is not a tokenizers JSON file ({e}); pass a tokenizer.json saved by the "
                            "`tokenizers` library") from None
        folder = file.parent
        cfg = _read_json(folder / "tokenizer_config.json")
        vocab = backend.get_vocab()
        eos = _token_text(cfg.get("eos_token")) or next((n for n in _EOS_NAMES if n in vocab), None)
        bos = _token_text(cfg.get("bos_token")) or next((n for n in _BOS_NAMES if n in vocab), eos)
        for key, name in (("bos_token", bos), ("eos_token", eos)):
            if name is not None and name not in vocab:
                raise UserError(f"tokenizer_config.json names {key} {name!r}, which is not in {file}; fix the name")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        eos_ids = _ids(_read_json(folder / "config.json").get("eos_token_id"))
        eos_ids += _ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
        return cls(backend, bos, eos, bool(cfg.get("add_bos_token", False)),
                   template if isinstance(template, str) else None, tuple(eos_ids))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.backend.token_to_id(text)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation."""
        ids = [self.eos_id, *self.extra_eos_ids]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a server encoding a long prompt in a
        # worker thread keeps streaming to its other clients
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        bos = self.bos_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Training documents: each text as [bos] + tokens + [eos] (bos == eos for tokenizers with one
        end-of-text token)."""
        if self.eos_id is None:
            raise UserError("this tokenizer has no end-of-text token to separate documents; put a "
                            "tokenizer_config.json naming eos_token next to its tokenizer.json")
        encoded = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [[self.bos_id, *e.ids, self.eos_id] for e in encoded]

    def encode_stream(self, texts: list[str]) -> np.ndarray:
        """The documents' tokens (`encode_documents`) one after another: the text that evaluation cuts into
        windows."""
        return np.asarray([t for ids in self.encode_documents(texts) for t in ids], dtype=np.int64)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. A byte-level BPE token can hold part of a UTF-8 character, which
        decodes alone to U+FFFD: its raw bytes come from its symbols (GPT-2's byte-to-character table, or a
        byte-fallback piece such as <0xE4>)."""
        piece = self.backend.id_to_token(token_id)
        if piece is not None:
            fallback = _BYTE_FALLBACK.fullmatch(piece)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
            table = _byte_of_symbol()
            if isinstance(self.backend.decoder, decoders.ByteLevel) and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def to_json(self) -> str:
        return self.backend.to_str()

    def save(self, folder: Path, model_max_length: int | None = None) -> None:
        """tokenizer.json + tokenizer_config.json, each written to a temporary name and renamed."""
        folder.mkdir(parents=True, exist_ok=True)
        # add_bos_token: the run's documents all start with bos, so its prompts must too
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "add_bos_token": True,
                  "clean_up_tokenization_spaces": False}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if model_max_length:
            config["model_max_length"] = model_max_length
        atomic_write_text(folder / "tokenizer.json", self.to_json())
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: exact round trip for any text, no unknown token."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB} "
                        "(256 bytes + bos/eos)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # BOS in tokenizer.json itself: transformers' tokenizer backend ignores tokenizer_config.json's add_bos_token,
    # and a prompt without the BOS every training document starts with is out of distribution
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return Tokenizer(tok, BOS, EOS, add_bos_token=True)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer for training data: `Tokenizer.load`, refusing one without an end-of-text token."""
    tok = Tokenizer.load(path)
    if tok.eos_id is None:
        raise UserError(f"{path} has no end-of-text token the trainer can recognise; put a tokenizer_config.json "
                        "naming eos_token next to its tokenizer.json")
    return tok


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_of_symbol() -> dict[str, int]:
    """Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes for the
    characters from U+0100 on, in byte order."""
    direct = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in direct]
    return {**{chr(b): b for b in direct}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # transformers' serialised AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path, "fix or remove the file")
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []
