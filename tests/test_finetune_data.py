"""Fine-tuning data: which tokens the SFT loss counts, field maps over the shared files, bad records."""

import json
from pathlib import Path

import pytest
import torch

from shared_data import SHARED_DATA as SHARED
from dsmoe.data.tokenizer import load_tokenizer
from dsmoe.finetune import data as ftdata



@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_sft_loss_counts_exactly_the_assistant_tokens_of_a_chat(tok, tmp_path, chat_template):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "bye"}]
    records = ftdata.read_jsonl(write(tmp_path / "c.jsonl", [{"messages": messages}]), {})
    (example,), dropped = ftdata.encode_sft(records, tok, chat_template, seq_len=256)
    assert dropped == 0
    learned = [t for t, label in zip(example.ids, example.labels) if label != ftdata.IGNORE]
    # the template renders an assistant turn as "<|assistant|>" (prompt) + content + "\n" (the learned reply)
    enc = lambda text: tok.encode(text, add_special_tokens=False)
    assert learned == enc("hello there\n") + enc("bye\n")
    text = tok.decode(example.ids, skip_special_tokens=False)
    assert text == "<|bos|><|system|>be brief\n<|user|>hi\n<|assistant|>hello there\n<|user|>and?\n<|assistant|>bye\n"


def test_prompt_completion_learns_the_completion_and_eos(tok, tmp_path):
    records = ftdata.read_jsonl(write(tmp_path / "p.jsonl", [{"q": "2+2", "a": "4"}]),
                                {"prompt": "Q: {q}\nA:", "completion": " {a}"})
    (example,), _ = ftdata.encode_sft(records, tok, None, seq_len=64)
    learned = [t for t, label in zip(example.ids, example.labels) if label != ftdata.IGNORE]
    enc = lambda text: tok.encode(text, add_special_tokens=False)
    assert learned == enc(" 4") + [tok.eos_id]
    assert example.ids[:1 + len(enc("Q: 2+2\nA:"))] == [tok.bos_id] + enc("Q: 2+2\nA:")


@pytest.mark.parametrize("name,preset,fields", [("xquad_en_test.jsonl", "qa", ("context", "answer")),
                                                ("ntrex128_test.jsonl", "translation", ("source", "target")),
                                                ("scitldr_test.jsonl", "summarization", ("document", "summary"))])
def test_field_map_presets_read_the_shared_files(name, preset, fields):
    if not (SHARED / name).is_file():
        pytest.skip(f"shared data not found at {SHARED} (set DSMOE_SHARED_DATA)")
    where, record = ftdata.read_jsonl(SHARED / name, ftdata.parse_field_map([preset]))[0]
    raw = json.loads((SHARED / name).read_text().splitlines()[0])
    assert raw[fields[0]] in record["prompt"] and record["completion"] == " " + raw[fields[1]]


def test_bad_records_are_one_clear_error_each(tok, tmp_path, chat_template):
    bad_json = write(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, "", "{not json"])
    with pytest.raises(ftdata.DataError, match=r"bad.jsonl:3: not valid JSON"):
        ftdata.read_jsonl(bad_json, {})
    no_assistant = ftdata.read_jsonl(write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}]), {})
    with pytest.raises(ftdata.DataError, match=r"c.jsonl:1: the conversation has no assistant turn"):
        ftdata.encode_sft(no_assistant, tok, chat_template, 64)
    records = ftdata.read_jsonl(write(tmp_path / "l.jsonl", [{"text": "a", "label": "spam"},
                                                            {"text": "b", "label": "hma"}]), {})
    with pytest.raises(ftdata.DataError, match=r"l.jsonl:2: label 'hma' is not in the label set"):
        ftdata.encode_classify(records, tok, ["ham", "spam"], 64)
    with pytest.raises(ftdata.DataError, match=r"no field 'question'"):
        ftdata.read_jsonl(write(tmp_path / "q.jsonl", [{"context": "c"}]), ftdata.parse_field_map(["qa"]))


def test_batches_are_a_pure_function_of_the_step_and_right_padded(tok):
    examples = [ftdata.Example(list(range(2, 2 + n)), [ftdata.IGNORE] + list(range(3, 2 + n))) for n in (3, 7, 5, 4)]
    source = ftdata.ExampleSource(examples, seed=1, pad_id=1)
    a = source.batches(5, micro_batch=2, grad_accum=2)
    b = source.batches(5, micro_batch=2, grad_accum=2)
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(a, b))
    first = a[0]
    for row, length in enumerate(first.lengths.tolist()):
        assert (first.ids[row, length:] == 1).all() and (first.labels[row, length:] == ftdata.IGNORE).all()
    epoch = [i for s in range(2) for i in ftdata.step_examples(4, seed=1, step=s, per_step=2)]
    assert sorted(epoch) == [0, 1, 2, 3]  # one epoch visits every example once


def test_batch_widths_round_up_to_64_but_not_past_the_longest_example():
    assert [ftdata.padded_width(n, cap=300) for n in (1, 64, 65, 250, 300)] == [64, 64, 128, 256, 300]
    assert ftdata.padded_width(40, cap=50) == 50
    long = [ftdata.Example(list(range(2, 2 + n)), [ftdata.IGNORE] + list(range(3, 2 + n))) for n in (70, 3, 150)]
    widths = {b.ids.shape[1] for s in range(3) for b in ftdata.ExampleSource(long, seed=0, pad_id=1)
              .batches(s, micro_batch=1, grad_accum=1)}
    assert widths <= {64, 128, 150}
    (_, batch), = ftdata.eval_batches(long[:2], batch_size=2, pad_id=1)
    assert batch.ids.shape[1] == 70 and batch.lengths.tolist() == [3, 70]
