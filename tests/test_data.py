"""Data pipeline: corpus sources, tokenizer round trip, the validation split, cached shards, batch determinism."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from shared_data import SHAKESPEARE
from dsmoe.data import shards as shards_module
from dsmoe.data.batches import eval_windows, step_batches
from dsmoe.data.prepare import prepare_corpus, read_documents
from dsmoe.data.shards import split_documents
from dsmoe.data.sources import Document, builtin_corpus, limit_corpus, read_corpus
from dsmoe.data.tokenizer import BOS, EOS, load_tokenizer, train_tokenizer
from dsmoe.errors import UserError

TRICKY = ["  leading spaces\ttabs\r\nCRLF", "unicode: naïve café 日本語 🙂 ∑", "", "x",
          "def f(a, b):\n    return a**b\n"]


def write_docs(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * (5 + i))
    return folder


def test_sources_files_folders_globs_and_jsonl(tmp_path):
    folder = write_docs(tmp_path / "txt", 3)
    (folder / "skip.bin").write_bytes(b"\0\1\2")  # not a text extension: ignored in a folder
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "first record"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    docs = read_corpus([str(folder), str(tmp_path / "txt" / "doc0*.txt"), str(jsonl)], text_field="body")
    assert [d.text for d in docs[-2:]] == ["first record", "second"]
    assert len(docs) == 3 + 3 + 2
    assert docs[0].name.endswith("doc00.txt")


def test_xz_compressed_files_read_like_the_plain_ones(tmp_path):
    import lzma

    # raw line and paragraph separators inside a string (Wikipedia has them) do not end a JSONL line
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ("first café\u2028\x85", "second"))
    (tmp_path / "d.jsonl").write_text(lines)
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress(lines.encode()))
    (tmp_path / "t.txt.xz").write_bytes(lzma.compress("plain text".encode()))
    plain, packed = read_corpus([str(tmp_path / "d.jsonl")]), read_corpus([str(tmp_path / "d.jsonl.xz")])
    assert [d.text for d in packed] == [d.text for d in plain] == ["first café\u2028\x85", "second"]
    assert [d.text for d in read_corpus([str(tmp_path / "t.txt.xz")])] == ["plain text"]
    (tmp_path / "bad.xz").write_bytes(b"not xz")
    with pytest.raises(UserError, match="not a valid xz"):
        read_corpus([str(tmp_path / "bad.xz")])


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\nnot json\n', "not valid JSON"),
    ('{"body": "no text field"}\n', "--text-field"),
])
def test_bad_jsonl_names_the_line_and_the_fix(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        read_corpus([str(f)])


def test_missing_and_empty_corpora_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_corpus([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="matches no files"):
        read_corpus([str(tmp_path / "*.nothing")])
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="holds no text"):
        read_corpus([str(tmp_path / "blank.txt")])


def test_builtin_corpus_is_the_stdlib_without_tests():
    docs = builtin_corpus()
    names = [d.name for d in docs]
    assert len(docs) > 100 and any(n.endswith("json/decoder.py") for n in names)
    assert not any(part.startswith("test") for n in names for part in n.split("/"))
    assert not any("site-packages" in n for n in names)


def test_limit_corpus_is_a_deterministic_capped_subset():
    docs = [Document(str(i), f"{i} " * (10 + i)) for i in range(50)]
    a, b = limit_corpus(docs, 1000), limit_corpus(list(docs), 1000)
    assert [d.name for d in a] == [d.name for d in b]
    assert sum(len(d.text.encode()) for d in a) <= 1000
    assert [d.name for d in a] == sorted((d.name for d in a), key=int)  # corpus order kept
    assert limit_corpus(docs, None) is docs
    (head,) = limit_corpus([Document("big", "é" * 100)], 11)  # cut inside a character: dropped, not mangled
    assert head.text == "é" * 5


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    text = Path(SHAKESPEARE).read_text()[:20000]
    tok = train_tokenizer([text, *TRICKY], vocab_size=400)
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.vocab_size == 400
    for sample in TRICKY + [text[:500]]:
        assert tok.decode(tok.encode(sample)) == sample
    (ids,) = tok.encode_documents(["hello"])
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    tok.save(tmp_path, model_max_length=128)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == (BOS, EOS)
    again = load_tokenizer(tmp_path)
    assert again.encode(TRICKY[1]) == tok.encode(TRICKY[1])
    from transformers import AutoTokenizer  # the exported tokenizer starts prompts with BOS in transformers too

    assert AutoTokenizer.from_pretrained(str(tmp_path))(TRICKY[1]).input_ids == tok.encode(TRICKY[1])
    # the same wrapper serves the run: prompts start with bos like the training documents, eos stops
    assert again.encode("hello") == ids[:-1] and again.eos_ids == (tok.eos_id,)


def test_encoding_lets_other_threads_run():
    """The server encodes prompts in a worker thread; the GIL must be free meanwhile, or a long prompt stalls
    every stream. (tokenizers' `encode` holds it for the whole call: the main thread below then gets one turn.)"""
    import threading

    tok = train_tokenizer(["def f(x): return x"] * 20, vocab_size=300)
    text = "def f(x): return x + 1  # a long prompt\n" * 20_000
    worker = threading.Thread(target=tok.encode, args=(text,))
    turns = 0
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        turns += 1
    assert turns > 5


def test_byte_level_vocabulary_is_one_token_per_byte():
    tok = train_tokenizer(["abc abc"], vocab_size=258)
    assert tok.vocab_size == 258
    sample = "naïve 🙂"
    assert len(tok.encode(sample, add_special_tokens=False)) == len(sample.encode())
    assert tok.decode(tok.encode(sample)) == sample
    ids = tok.encode(sample, add_special_tokens=False)  # each byte of ï and 🙂 alone decodes to U+FFFD
    assert [tok.token_bytes(i) for i in ids] == [bytes([b]) for b in sample.encode()]
    with pytest.raises(UserError, match="at least 258"):
        train_tokenizer(["abc"], vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a tokenizers JSON"):
        load_tokenizer(tmp_path)


def test_split_by_document_and_by_tail():
    docs = [Document(str(i), f"text number {i}") for i in range(20)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 2 and len(train) == 18 and not set(train) & set(val)
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))  # chosen by content, not order
    text = "abcdefghij" * 10
    train, val = split_documents([Document("one", text)], 0.1)  # few documents: the tail of each
    assert train == [text[:90]] and val == [text[90:]]
    assert split_documents(docs, 0.0) == ([d.text for d in docs], [])


def test_split_holds_its_fraction_of_tokens_with_a_few_large_documents():
    """The defect of whole-document splits: three large files among small ones put a third of the tokens in
    validation. Now the split holds 10% of the tokens, whichever documents the hash order picks."""
    vocabulary = np.array(["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café"])
    words = list(vocabulary[np.random.default_rng(0).integers(0, len(vocabulary), 130_000)])
    small = [Document(f"s{i}", " ".join(words[i * 50:(i + 1) * 50])) for i in range(40)]
    large = [Document(f"l{i}", " ".join(words[i * 40_000:(i + 1) * 40_000])) for i in range(3)]
    tokenizer = train_tokenizer([" ".join(words[:20_000])], vocab_size=400)
    for docs in (small + large, large + small[:9]):
        train, val = split_documents(docs, 0.1)
        n_train, n_val = (sum(len(ids) for ids in tokenizer.encode_documents(texts)) for texts in (train, val))
        assert n_val / (n_train + n_val) == pytest.approx(0.1, abs=0.01)
        assert sorted("".join(train + val)) == sorted("".join(d.text for d in docs))  # each character once


def test_shards_are_cached_by_content(tmp_path, monkeypatch):
    docs = read_documents([str(write_docs(tmp_path / "docs"))])
    first = prepare_corpus(docs, val_fraction=0.2, vocab_size=300, cache_dir=tmp_path / "cache")
    # two whole documents and the tail of a third make up 20% of the text
    assert first.shards.meta["val_documents"] == 3 and first.shards.meta["train_documents"] == 10
    assert first.shards.train.dtype == np.uint16
    expected = [t for ids in first.tokenizer.encode_documents(split_documents(docs, 0.2)[0]) for t in ids]
    assert first.shards.train.tolist() == expected

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(shards_module, "_build", fail)
    second = prepare_corpus(docs, val_fraction=0.2, vocab_size=300, cache_dir=tmp_path / "cache")
    assert second.shards.path == first.shards.path
    assert np.array_equal(second.shards.train, first.shards.train)
    monkeypatch.undo()
    changed = docs[:-1] + [Document("new", docs[-1].text + " changed")]
    third = prepare_corpus(changed, val_fraction=0.2, vocab_size=300, cache_dir=tmp_path / "cache")
    assert third.shards.path != first.shards.path
    assert not list((tmp_path / "cache" / "tokens").glob(".*"))  # no temporary folders left


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(seq_len=16, micro_batch=4, grad_accum=2, seed=3)
    a = step_batches(tokens, step=7, **kw)
    assert len(a) == 2 and a[0].shape == (4, 17) and a[0].dtype == np.int64
    assert all(np.array_equal(x, y) for x, y in zip(a, step_batches(tokens, step=7, **kw)))
    assert not np.array_equal(a[0], step_batches(tokens, step=8, **kw)[0])
    assert not np.array_equal(a[0], step_batches(tokens, step=7, **{**kw, "seed": 4})[0])
    row = a[0][0]
    assert np.array_equal(row, np.arange(row[0], row[0] + 17))  # a contiguous window


def test_data_parallel_ranks_split_the_same_global_batch():
    tokens = np.arange(5_000, dtype=np.uint16)
    single = np.concatenate(step_batches(tokens, seq_len=8, micro_batch=2, grad_accum=4, seed=0, step=5))
    ranks = [np.concatenate(step_batches(tokens, seq_len=8, micro_batch=2, grad_accum=2, seed=0, step=5,
                                         dp_rank=r, dp_size=2)) for r in range(2)]
    assert np.array_equal(single, np.concatenate(ranks))


def test_eval_windows_predict_each_token_once():
    tokens = np.arange(103)
    windows = eval_windows(tokens, seq_len=10)
    assert len(windows) == 10 and all(len(w) == 11 for w in windows)
    targets = np.concatenate([w[1:] for w in windows])
    assert np.array_equal(targets, np.arange(1, 101))
    assert len(eval_windows(tokens, seq_len=10, max_tokens=35)) == 3
    (short,) = eval_windows(np.arange(5), seq_len=10)
    assert len(short) == 5
    assert eval_windows(np.arange(1), seq_len=10) == []
