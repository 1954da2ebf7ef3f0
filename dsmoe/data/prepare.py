"""From corpus specs to a tokenizer and token shards, cached so a second run over the same text starts at once.

Cache (default ~/.cache/dsmoe, or $DSMOE_CACHE): tokenizers/<hash>.json for trained tokenizers (keyed by
the training text and vocabulary size) and tokens/<hash>/ for shards (see shards.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dsmoe.atomic import atomic_write_text
from dsmoe.data.shards import (
    TokenShards,
    load_or_build_shards,
    shards_key,
    split_documents,
)
from dsmoe.data.sources import Document, corpus_hash, limit_corpus, read_corpus
from dsmoe.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreparedCorpus:
    tokenizer: Tokenizer
    shards: TokenShards
    corpus_hash: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSMOE_CACHE") or Path.home() / ".cache" / "dsmoe")


def read_documents(data: list[str], text_field: str = "text", limit_bytes: int | None = None) -> list[Document]:
    """The corpus of `--data` (the built-in corpus when empty), capped at limit_bytes."""
    return limit_corpus(read_corpus(data, text_field), limit_bytes)


def prepare_corpus(docs: list[Document], *, val_fraction: float = 0.1, tokenizer_path: str | None = None,
                   vocab_size: int = 8192, cache_dir: Path | None = None) -> PreparedCorpus:
    """Split, tokenizer (loaded from tokenizer_path, else trained on the training split, cached) and shards."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    chash = corpus_hash(docs)
    train_texts, val_texts = split_documents(docs, val_fraction)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = _cached_trained_tokenizer(train_texts, vocab_size, cache_dir, chash, val_fraction)
    shards = load_or_build_shards(train_texts, val_texts, tokenizer,
                                  shards_key(chash, val_fraction, tokenizer), cache_dir)
    return PreparedCorpus(tokenizer, shards, chash)


def _cached_trained_tokenizer(train_texts: list[str], vocab_size: int, cache_dir: Path, chash: str,
                              val_fraction: float) -> Tokenizer:
    key = hashlib.sha256(f"{chash}|{vocab_size}|{val_fraction!r}|bpe-bytelevel-bos-v2".encode()).hexdigest()[:24]
    file = cache_dir / "tokenizers" / f"{key}.json"
    if file.is_file():
        return load_tokenizer(file)
    log.info("training a byte-level BPE tokenizer (vocab %d) on %.1f MB of text", vocab_size,
             sum(len(t) for t in train_texts) / 1e6)
    tokenizer = train_tokenizer(train_texts, vocab_size)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, tokenizer.to_json())
    return tokenizer
