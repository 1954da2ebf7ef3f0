"""Token shards: the corpus tokenized once into flat numpy memmaps (train.bin, val.bin) with a held-out
validation split, cached under a hash of the corpus content, the split and the tokenizer.

Layout of one cache entry (a folder renamed into place when complete, so a crash leaves no half entry):
  train.bin, val.bin   uint16 token ids (uint32 when the vocabulary exceeds 65535), documents back to back
  meta.json            dtype, token and byte counts of each split, documents per split
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsmoe.data.sources import Document
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.errors import UserError

SPLIT_VERSION = 2  # bump when the split or the document encoding changes: old cache entries are then unused
MIN_DOCS_FOR_DOCUMENT_SPLIT = 10
SPLIT_TOLERANCE = 0.05  # the held-out text may fall short of its target by this share of it
_ENCODE_CHUNK = 256  # documents per encode_batch call: bounds memory on large corpora


@dataclass
class TokenShards:
    train: np.ndarray  # memmap
    val: np.ndarray  # memmap (empty when val_fraction is 0)
    meta: dict
    path: Path

    @property
    def val_tokens_per_byte(self) -> float:
        """Converts a mean loss per token into nats per byte of text (comparable across tokenizers)."""
        return self.meta["val_tokens"] / max(self.meta["val_bytes"], 1)


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out val_fraction of the corpus's text (characters, a stand-in for tokens), within SPLIT_TOLERANCE of
    it. A corpus of a few long texts (< MIN_DOCS_FOR_DOCUMENT_SPLIT) gives the last val_fraction of each text
    (nanoGPT's tinyshakespeare split). Otherwise whole documents are held out, taken in content-hash order (a
    stable choice) when they still fit the target; if that falls short (large documents), the tail of the next
    document in that order makes up the rest, so a few large files cannot take far more than val_fraction."""
    texts = [d.text for d in docs]
    if val_fraction <= 0:
        return texts, []
    if len(docs) < MIN_DOCS_FOR_DOCUMENT_SPLIT:
        cuts = [int(len(t) * (1 - val_fraction)) for t in texts]
        return [t[:c] for t, c in zip(texts, cuts)], [t[c:] for t, c in zip(texts, cuts) if t[c:]]
    target = val_fraction * sum(len(t) for t in texts)
    ranked = sorted(range(len(docs)), key=lambda i: hashlib.sha1(texts[i].encode()).hexdigest())
    held, size = set(), 0
    for i in ranked:
        if size + len(texts[i]) <= target:
            held.add(i)
            size += len(texts[i])
    train = [t for i, t in enumerate(texts) if i not in held]
    val = [t for i, t in enumerate(texts) if i in held]
    missing = round(target - size)
    if missing > SPLIT_TOLERANCE * target:
        cut = next(i for i in ranked if i not in held)  # longer than `missing`, or it would have been taken
        head, tail = texts[cut][:-missing], texts[cut][-missing:]
        train = [head if i == cut else t for i, t in enumerate(texts) if i not in held]
        val.append(tail)
    return train, val


def shards_key(corpus_hash: str, val_fraction: float, tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    for part in (f"v{SPLIT_VERSION}", corpus_hash, repr(float(val_fraction)), tokenizer.bos_token,
                 tokenizer.eos_token, tokenizer.to_json()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def load_or_build_shards(train_texts: list[str], val_texts: list[str], tokenizer: Tokenizer, key: str,
                         cache_dir: Path) -> TokenShards:
    folder = cache_dir / "tokens" / key
    if not (folder / "meta.json").is_file():
        _build(folder, train_texts, val_texts, tokenizer)
    return open_shards(folder)


def open_shards(folder: Path) -> TokenShards:
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])

    def open_split(name: str) -> np.ndarray:
        count = meta[f"{name}_tokens"]
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=(count,))

    return TokenShards(open_split("train"), open_split("val"), meta, folder)


def _build(folder: Path, train_texts: list[str], val_texts: list[str], tokenizer: Tokenizer) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "split_version": SPLIT_VERSION}
        for name, texts in (("train", train_texts), ("val", val_texts)):
            meta[f"{name}_tokens"] = _write_tokens(tmp / f"{name}.bin", texts, tokenizer, dtype)
            meta[f"{name}_bytes"] = sum(len(t.encode()) for t in texts)
            meta[f"{name}_documents"] = len(texts)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_tokens(path: Path, texts: list[str], tokenizer: Tokenizer, dtype) -> int:
    count = 0
    with open(path, "wb") as f:
        for start in range(0, len(texts), _ENCODE_CHUNK):
            for ids in tokenizer.encode_documents(texts[start:start + _ENCODE_CHUNK]):
                np.asarray(ids, dtype=dtype).tofile(f)
                count += len(ids)
    return count


def check_enough_tokens(shards: TokenShards, seq_len: int) -> None:
    if len(shards.train) < seq_len + 1:
        raise UserError(f"the training split has {len(shards.train)} tokens, fewer than --seq-len {seq_len} + 1: "
                        "pass more text with --data or lower --seq-len")
