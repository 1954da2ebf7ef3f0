"""Fine-tuning data: which tokens the SFT loss counts, field maps over the shared files, bad records."""

import json
from pathlib import Path

import pytest
import torch

from shared_data import SHARED_DATA as SHARED
from dsmoe.data.tokenizer import load_tokenizer
from dsmoe.errors import UserError
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


def test_a_long_example_loses_its_prompts_start_not_its_answer(tok, tmp_path):
    """As task evaluation cuts prompts from the left: a QA example whose context is too long keeps the question
    and the answer (cut from the end, it kept the context and lost everything it could learn)."""
    records = ftdata.read_jsonl(write(tmp_path / "p.jsonl", [{"c": "word " * 200, "q": "2+2", "a": "4"}]),
                                {"prompt": "{c}\nQ: {q}\nA:", "completion": " {a}"})
    (example,), dropped = ftdata.encode_sft(records, tok, None, seq_len=32)
    enc = lambda text: tok.encode(text, add_special_tokens=False)
    assert dropped == 0 and len(example.ids) == 32 + 1 and example.ids[0] == tok.bos_id  # seq_len predictions
    assert tok.decode(example.ids).endswith("word \nQ: 2+2\nA: 4")
    assert [t for t, label in zip(example.ids, example.labels) if label != ftdata.IGNORE] == enc(" 4") + [tok.eos_id]


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
    no_assistant_file = write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    no_assistant = ftdata.read_jsonl(no_assistant_file, {})
    with pytest.raises(ftdata.DataError, match=r"c.jsonl:1: the conversation has no assistant turn"):
        ftdata.encode_sft(no_assistant, tok, chat_template, 64)
    records = ftdata.read_jsonl(write(tmp_path / "l.jsonl", [{"text": "a", "label": "spam"},
                                                            {"text": "b", "label": "hma"}]), {})
    with pytest.raises(ftdata.DataError, match=r"l.jsonl:2: label 'hma' is not in the label set"):
        ftdata.encode_classify(records, tok, ["ham", "spam"], 64)
    null_content = ftdata.read_jsonl(write(tmp_path / "n.jsonl", [{"messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}]), {})
    with pytest.raises(ftdata.DataError, match=r"n.jsonl:1: \"messages\" must be a list"):  # not the text "None"
        ftdata.encode_sft(null_content, tok, chat_template, 64)
    with pytest.raises(ftdata.DataError, match=r"no field 'question'"):
        ftdata.read_jsonl(write(tmp_path / "q.jsonl", [{"context": "c"}]), ftdata.parse_field_map(["qa"]))
    with pytest.raises(UserError, match=r"--field-map 'prompt=\{prompt\[0\}'.*malformed"):
        ftdata.parse_field_map(["prompt={prompt[0}"])
    with pytest.raises(UserError, match=r"q.jsonl:1: --field-map prompt: cannot fill"):  # an unknown conversion
        ftdata.read_jsonl(write(tmp_path / "q.jsonl", [{"q": "c"}]), ftdata.parse_field_map(["prompt={q!x}"]))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "a", "label": "x"}\n{"text": "caf\u00e9", "label": "x"}\n'.encode("latin-1"))
    with pytest.raises(ftdata.DataError, match=r"latin1.jsonl:2: not UTF-8 text"):
        ftdata.read_jsonl(latin1, {})


def classify_examples(lengths):
    return [ftdata.Example(list(range(2, 2 + n)), i % 2) for i, n in enumerate(lengths)]


def sft_examples(lengths):
    return [ftdata.Example(list(range(2, 2 + n)), [ftdata.IGNORE] + list(range(3, 2 + n))) for n in lengths]


def test_classify_batches_are_a_pure_function_of_the_step_and_right_padded():
    source = ftdata.ExampleSource(classify_examples([3, 7, 5, 4]), seed=1, pad_id=1)
    a = source.batches(5, micro_batch=2, grad_accum=2)
    b = source.batches(5, micro_batch=2, grad_accum=2)
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(a, b))
    first = a[0]
    for row, length in enumerate(first.lengths.tolist()):
        assert (first.ids[row, length:] == 1).all()
    epoch = [i for s in range(2) for i in ftdata.step_examples(4, seed=1, step=s, per_step=2)]
    assert sorted(epoch) == [0, 1, 2, 3]  # one epoch visits every example once


def test_batch_widths_round_up_to_64_but_not_past_the_longest_example():
    assert [ftdata.padded_width(n, cap=300) for n in (1, 64, 65, 250, 300)] == [64, 64, 128, 256, 300]
    assert ftdata.padded_width(40, cap=50) == 50
    long = classify_examples([70, 3, 150])
    widths = {b.ids.shape[1] for s in range(3) for b in ftdata.ExampleSource(long, seed=0, pad_id=1)
              .batches(s, micro_batch=1, grad_accum=1)}
    assert widths <= {64, 128, 150}
    (_, batch), = ftdata.eval_batches(long[:2], batch_size=2, pad_id=1)
    assert batch.ids.shape[1] == 70 and batch.lengths.tolist() == [3, 70]


def test_first_fit_packing_places_every_example_once_within_the_width():
    sizes = torch.randint(1, 60, (500,), generator=torch.Generator().manual_seed(0)).numpy()
    rows = ftdata.pack(sizes, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    fills = [sum(int(sizes[i]) for i in row) for row in rows]
    assert max(fills) <= 128
    assert sum(fills) / (128 * len(rows)) > 0.95  # first fit by decreasing size leaves little room unused
    assert ftdata.pack(sizes[:0], 128) == []


def test_a_packed_row_restarts_positions_per_example_and_aligns_the_targets():
    a, b = sft_examples([4, 6])
    a.labels = [ftdata.IGNORE, ftdata.IGNORE, 4, 5]  # a prompt token: not a target
    batch = ftdata.packed_batch([[a, b], [b]], pad_id=1, width=100)
    assert batch.input_ids.shape == (2, 64)  # the fullest row (3 + 5 positions) rounded up to 64, under 100
    assert batch.input_ids[0, :8].tolist() == a.ids[:-1] + b.ids[:-1]
    assert batch.labels[0, :8].tolist() == a.labels[1:] + b.labels[1:]
    assert batch.positions[0, :8].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert batch.segment_ids[0, :9].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, -1]
    assert batch.token_mask.sum(1).tolist() == [8, 5]
    assert (batch.labels[:, 8:] == ftdata.IGNORE).all() and (batch.input_ids[1, 5:] == 1).all()


@pytest.mark.parametrize("dp_size", [1, 2])
def test_packed_steps_are_pure_functions_of_the_step_that_visit_each_example_once_per_epoch(dp_size):
    examples = sft_examples([int(n) for n in torch.randint(2, 40, (61,), generator=torch.Generator().manual_seed(1))])
    fresh = lambda: ftdata.PackedSource(examples, seed=3, pad_id=1, width=64)
    source = fresh()
    n_rows = len(ftdata.pack(source.sizes, 64))

    def step_rows(src, step):
        batches = [b for r in range(dp_size)
                   for b in src.batches(step, micro_batch=2, grad_accum=2, dp_rank=r, dp_size=dp_size)]
        return [(b.input_ids[i], b.segment_ids[i]) for b in batches for i in range(len(b.input_ids))]

    seen = []
    steps = -(-n_rows // (4 * dp_size)) + 2  # past the end of the first epoch
    for step in range(steps):
        seen += step_rows(source, step)
    later = step_rows(fresh(), steps - 1)  # a resumed run starts at its step, with no history
    again = step_rows(source, steps - 1)
    assert len(later) == len(again) == 4 * dp_size and all(torch.equal(x[0], y[0]) for x, y in zip(later, again))
    first_epoch = seen[:source.rows_per_epoch[0]]
    packed_sizes = [int((seg == j).sum()) for _, seg in first_epoch for j in range(int(seg.max()) + 1)]
    assert sorted(packed_sizes) == sorted(len(e.ids) - 1 for e in examples)
