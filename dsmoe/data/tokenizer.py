"""Tokenizers: train a byte-level BPE with the `tokenizers` library, or load an existing `tokenizer.json`.

A trained tokenizer starts with the two special tokens `<|bos|>` (id 0) and `<|eos|>` (id 1), then the
256 byte symbols, then the merges: `--vocab-size 258` is a pure byte-level model (one token per byte,
so its loss per token is a loss per byte). Every document is encoded as `<|bos|> text <|eos|>`.
A run folder holds `tokenizer.json` and `tokenizer_config.json` (the bos/eos names that transformers'
`PreTrainedTokenizerFast` and the dsmoe inference code read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsmoe.atomic import atomic_write_text
from dsmoe.errors import UserError

BOS, EOS = "<|bos|>", "<|eos|>"
MIN_VOCAB = 256 + 2  # the byte alphabet plus bos/eos
# Names other tokenizers use, tried in order when no tokenizer_config.json names them.
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|startoftext|>")
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|im_end|>")


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    bos_token: str
    eos_token: str

    @property
    def bos_id(self) -> int:
        return self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Each text as [bos] + tokens + [eos] (bos == eos for tokenizers with one end-of-text token)."""
        encoded = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [[self.bos_id, *e.ids, self.eos_id] for e in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def save(self, folder: Path, model_max_length: int | None = None) -> None:
        """tokenizer.json + tokenizer_config.json, each written to a temporary name and renamed."""
        folder.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "add_bos_token": True, "clean_up_tokenization_spaces": False}
        if model_max_length:
            config["model_max_length"] = model_max_length
        atomic_write_text(folder / "tokenizer.json", self.to_json())
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE: exact round trip for any text, no unknown token."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB} "
                        "(256 bytes + bos/eos)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok, BOS, EOS)


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A tokenizer.json file, or a folder holding one (and maybe tokenizer_config.json naming bos/eos)."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no tokenizer at {path}: pass a tokenizer.json file or a folder that holds one")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception subclasses for any parse error
        raise UserError(f"{file} is not a tokenizers JSON file ({e}); pass a tokenizer.json saved by the "
                        "`tokenizers` library") from None
    names = _config_names(file.parent / "tokenizer_config.json")
    vocab = tok.get_vocab()
    eos = names.get("eos_token") or next((n for n in _EOS_NAMES if n in vocab), None)
    if eos is None or eos not in vocab:
        raise UserError(f"{file} has no end-of-text token the trainer can recognise; put a tokenizer_config.json "
                        "naming eos_token next to it")
    bos = names.get("bos_token") or next((n for n in _BOS_NAMES if n in vocab), eos)
    if bos not in vocab:
        raise UserError(f"tokenizer_config.json names bos_token {bos!r}, which is not in {file}; fix the name")
    return TextTokenizer(tok, bos, eos)


def _config_names(config_file: Path) -> dict[str, str]:
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e.msg}); fix or remove it") from None
    names = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):  # transformers' serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names

