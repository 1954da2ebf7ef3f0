"""`dsmoe eval --task`: bad input named with its line, batched scoring equal to one request at a time and to
the model's own log-probabilities, generation equal to a plain greedy loop, chat loss over assistant tokens
only, the classifier head equal to transformers' DeepseekV3ForSequenceClassification, and each task kind end
to end on the shared data."""

import json
import shutil

import pytest
import torch

from shared_data import SHARED_DATA as SHARED
from dsmoe.cli import main
from dsmoe.presets import get_preset
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.errors import UserError
from dsmoe.model.transformer import build_model
from dsmoe.tasks.scoring import ScoreRequest, score_requests
from dsmoe.tasks.specs import BUILTIN, get_task, read_examples

pytestmark = pytest.mark.usefixtures("single_thread")
needs_data = pytest.mark.skipif(not (SHARED / "rt_polarity_test.jsonl").is_file(),
                                reason=f"the shared data folder {SHARED} is missing (set DSMOE_SHARED_DATA)")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from dsmoe.checkpoint.hf import load_pretrained

    return load_pretrained(model_dir, dtype=torch.float32).eval(), Tokenizer.load(model_dir)


# ---------------------------------------------------------------- bad input

def test_bad_lines_are_named_with_their_number(tmp_path):
    spec = BUILTIN["sms_spam"]
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi", "label": "ham"}\n\n{"text": "x", "label": "ham"\n')
    with pytest.raises(UserError, match=r"d.jsonl:3 is not valid JSON"):
        read_examples(path, spec)
    path.write_text('{"text": "hi", "label": "ham"}\n{"label": "spam"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: missing field\(s\) text"):
        read_examples(path, spec)
    path.write_text('{"text": "hi", "label": "eggs"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: label 'eggs' is not one of task sms_spam's labels \(ham, spam\)"):
        read_examples(path, spec)
    path.write_text('[1, 2]\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: expected a JSON object"):
        read_examples(path, spec)
    scitldr = BUILTIN["scitldr"]
    path.write_text('{"document": "s", "summary": "a", "summaries": []}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: summaries must be a reference text or a non-empty list"):
        read_examples(path, scitldr)
    path.write_text('{"document": "s", "summary": "a", "summaries": "A single reference"}\n')
    assert read_examples(path, scitldr)[0]["summaries"] == ["A single reference"]  # not split into characters


def test_unknown_task_and_metric_name_the_known_ones(tmp_path):
    with pytest.raises(UserError, match="unknown task 'sentiment'; known tasks: rt_polarity, dbpedia14, sms_spam"):
        get_task("sentiment")
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"kind": "generation", "metric": "bleurt", "answer": "a", "prompt": "{q}"}))
    with pytest.raises(UserError, match="unknown metric 'bleurt'; known metrics: classification, squad, translation"):
        get_task(str(spec))
    spec.write_text(json.dumps({"kind": "generation", "metric": "squad", "answer": "a", "prompt": "Q: {q}\nA:"}))
    assert get_task(str(spec)).fields() == ["a", "q"]
    spec.write_text(json.dumps({"kind": "generation", "metric": "squad", "answer": "a", "prompt": "Q: {q"}))
    with pytest.raises(UserError, match="the template 'Q: \\{q' is malformed"):
        get_task(str(spec))


# ---------------------------------------------------------------- the scoring paths

def test_batched_scores_equal_one_at_a_time_and_the_models_logprobs(loaded):
    model, _ = loaded
    g = torch.Generator().manual_seed(0)
    requests = [ScoreRequest(torch.randint(2, 300, (n,), generator=g).tolist(), first)
                for n, first in [(9, 5), (3, 1), (17, 16), (12, 2), (5, 4)]]
    requests.append(ScoreRequest(requests[0].ids, 1, mask=(True, False) * 4))
    batched = score_requests(model, requests, batch_size=4)
    single = score_requests(model, requests, batch_size=1)
    for r, b, s in zip(requests, batched, single):
        with torch.no_grad():
            logp = model(torch.tensor([r.ids]))[0, :-1].log_softmax(-1)
        chosen = logp.gather(-1, torch.tensor(r.ids[1:])[:, None])[:, 0][r.first - 1:]
        greedy = (logp.argmax(-1) == torch.tensor(r.ids[1:]))[r.first - 1:]
        keep = torch.tensor(r.mask) if r.mask else torch.ones(len(chosen), dtype=torch.bool)
        assert b.logprob == pytest.approx(chosen[keep].sum().item(), abs=1e-4)
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)
        assert b.tokens == s.tokens == int(keep.sum())
        assert b.greedy == s.greedy == bool(greedy[keep].all())


def test_generation_equals_a_plain_greedy_loop_and_cuts_at_the_stop_string(loaded):
    from dsmoe.tasks.generation import generate_texts

    model, tok = loaded
    prompts = [tok.encode("def add(a, b):"), tok.encode("import"), tok.encode("class Parser(object):\n    ")]
    texts = generate_texts(model, tok, prompts, max_new_tokens=12, stop=[], max_batch=2)
    one = generate_texts(model, tok, prompts, max_new_tokens=12, stop=[], max_batch=1)
    assert texts == one
    for prompt, text in zip(prompts, texts):
        ids = list(prompt)
        for _ in range(12):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == tok.token_id(tok.eos_token):
                break
        assert text == tok.decode(ids[len(prompt):])
    stop = texts[0][3:5]
    cut = generate_texts(model, tok, prompts[:1], max_new_tokens=12, stop=[stop])
    assert cut == [texts[0][: texts[0].index(stop)]]


def test_chat_scores_assistant_tokens_only(loaded):
    from dsmoe.tasks.chat_loss import assistant_request

    _, tok = loaded
    messages = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "hello"}]
    request = assistant_request(tok, messages, max_len=512)
    scored = [t for t, keep in zip(request.ids[1:], request.mask) if keep]
    # the template (conftest.CHAT_TEMPLATE) ends each turn with "\n": the model must learn to write it
    assert tok.decode(scored) == "hi there\nhello\n"
    assert assistant_request(tok, messages[:1], max_len=512) is None


# ---------------------------------------------------------------- the classifier head

@pytest.fixture(scope="module")
def classifier_dir(model_dir, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(1)
    hf = transformers.DeepseekV3ForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1}, dtype=torch.float32)
    hf.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((model_dir / name).read_bytes())
    return path, hf.eval()


def test_classifier_head_equals_transformers(classifier_dir, loaded):
    from dsmoe.checkpoint.hf import load_pretrained
    from dsmoe.model.classifier import SequenceClassifier

    path, hf = classifier_dir
    ours = load_pretrained(path, dtype=torch.float32).eval()
    assert isinstance(ours, SequenceClassifier) and ours.labels == ["ham", "spam"]
    _, tok = loaded
    texts = ["Free entry in a weekly competition!", "ok see you", "Call me when you get home, I am at the station"]
    encoded = [tok.encode(t) for t in texts]
    lengths = torch.tensor([len(e) for e in encoded])
    padded = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for i, e in enumerate(encoded):
        padded[i, : len(e)] = torch.tensor(e)
    with torch.no_grad():
        batched = ours.classify(padded, lengths)
        for i, e in enumerate(encoded):
            expected = hf(torch.tensor([e])).logits[0]
            torch.testing.assert_close(batched[i], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="sequence classifier"):
        ours(padded)  # no LM head: generation and likelihood tasks are refused


def test_classifier_saved_by_dsmoe_loads_in_transformers_and_back(classifier_dir, tmp_path):
    import transformers

    from dsmoe.checkpoint.hf import load_pretrained, save_pretrained

    path, hf = classifier_dir
    ours = load_pretrained(path, dtype=torch.float32).eval()
    save_pretrained(ours, tmp_path / "saved")
    again = load_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert again.labels == ["ham", "spam"] and theirs.config.id2label == {0: "ham", 1: "spam"}
    ids = torch.tensor([[0, 5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(again.classify(ids), hf(ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs.eval()(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)


@needs_data
def test_classifier_head_through_the_cli_and_label_mismatch_refused(classifier_dir, tmp_path, capsys):
    path, _ = classifier_dir
    data = str(SHARED / "sms_spam_test.jsonl")
    assert main(["eval", str(path), "--task", "sms_spam", "--data", data, "--limit", "6", "--out",
                 str(tmp_path / "spam")]) == 0
    results = json.loads((tmp_path / "spam" / "results.json").read_text())
    assert results["examples"] == 6 and 0 <= results["metrics"]["accuracy"] <= 1
    assert main(["eval", str(path), "--task", "rt_polarity", "--data", str(SHARED / "rt_polarity_test.jsonl"),
                 "--limit", "2", "--out", str(tmp_path / "rt")]) == 2
    assert "head's labels (ham, spam" in capsys.readouterr().err
    assert not (tmp_path / "rt").exists()


def test_classifier_head_reads_the_text_as_fine_tuning_fed_it(classifier_dir, tmp_path, capsys):
    """The head learned from BOS + the raw text (dsmoe finetune --task classify); evaluating it on the task's
    prompt template instead ("Message: ...\nSpam or ham:") scored the wrong last token: near the majority class."""
    from dsmoe.checkpoint.hf import load_pretrained
    from dsmoe.finetune.data import encode_classify
    from dsmoe.train.config import TrainConfig

    path, _ = classifier_dir
    rows = [{"text": "Free entry in a weekly competition!", "label": "spam"}, {"text": "ok see you", "label": "ham"},
            {"text": "Call me when you get home, I am at the station", "label": "ham"}]
    data = tmp_path / "spam.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(path), "--task", "sms_spam", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    scored = [json.loads(line)["scores"] for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    model, tok = load_pretrained(path, dtype=torch.float32).eval(), Tokenizer.load(path)
    trained_on = encode_classify([("row", r) for r in rows], tok, ["ham", "spam"], seq_len=1024)
    for example, scores in zip(trained_on, scored):
        with torch.no_grad():
            expected = model.classify(torch.tensor([example.ids]))[0].log_softmax(-1)
        assert [scores["ham"], scores["spam"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert main(["eval", str(path), "--task", "sms_spam", "--data", str(data), "--shots", "1", "--shots-from",
                 str(data), "--out", str(tmp_path / "shots")]) == 2
    assert "drop --shots" in capsys.readouterr().err
    # a task spec of the user's whose prompt reads one field of another name: the head reads that field
    spec = tmp_path / "spam_msg.json"
    spec.write_text(json.dumps({"kind": "classification", "metric": "classification", "answer": "label",
                                "prompt": "SMS: {message}\nLabel:", "labels": ["ham", "spam"],
                                "verbalizers": {"ham": " ham", "spam": " spam"}}))
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"message": r["text"], "label": r["label"]}) + "\n" for r in rows))
    assert main(["eval", str(path), "--task", str(spec), "--data", str(renamed), "--out", str(tmp_path / "own")]) == 0
    own = [json.loads(line)["scores"] for line in (tmp_path / "own" / "predictions.jsonl").read_text().splitlines()]
    assert own == scored
    # a dsmoe fine-tune's folder: texts cut at its --seq-len, as training cut them (train_config.json)
    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    (cut / "train_config.json").write_text(json.dumps(TrainConfig(seq_len=4).to_dict()))
    assert main(["eval", str(cut), "--task", "sms_spam", "--data", str(data), "--out", str(tmp_path / "cut_out")]) == 0
    assert "first 4 tokens" in capsys.readouterr().out
    scored = [json.loads(line)["scores"] for line in (tmp_path / "cut_out" / "predictions.jsonl").read_text().splitlines()]
    for example, scores in zip(encode_classify([("row", r) for r in rows], tok, ["ham", "spam"], seq_len=4), scored):
        with torch.no_grad():
            expected = model.classify(torch.tensor([example.ids]))[0].log_softmax(-1)
        assert len(example.ids) == 4 and [scores["ham"], scores["spam"]] == pytest.approx(expected.tolist(), abs=1e-5)


# ---------------------------------------------------------------- each task kind end to end

@needs_data
@pytest.mark.parametrize("task,extra,keys", [
    ("rt_polarity", ["--shots", "2", "--shots-from", "rt_polarity_train.jsonl", "--bench"], ["accuracy", "macro_f1"]),
    ("xquad_en", [], ["exact_match", "f1"]),
    ("ntrex128", [], ["en-de"]),
    ("scitldr", [], ["rouge1", "rouge2", "rougeL"]),
    ("oasst1_en", [], ["loss", "perplexity"]),
])
def test_each_task_kind_from_the_command_line(model_dir, tmp_path, capsys, task, extra, keys):
    extra = [str(SHARED / x) if x.endswith(".jsonl") else x for x in extra]
    out = tmp_path / task
    assert main(["eval", str(model_dir), "--task", task, "--data", str(SHARED / f"{task}_test.jsonl"), "--limit", "2",
                 "--out", str(out), "--batch-size", "2", *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(keys) <= set(results["metrics"]) and results["examples"] == 2
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert keys[0] in printed and "examples/s" in printed
    if task == "rt_polarity":
        assert (out / "confusion.png").is_file() and (out / "confusion.json").is_file()
    if "--bench" in extra:
        assert results["one_at_a_time"]["examples_per_second"] > 0


@needs_data
def test_bench_tasks_runs_the_suite_batched_and_one_at_a_time(model_dir, tmp_path, capsys):
    assert main(["bench", "tasks", "--model", str(model_dir), "--data-dir", str(SHARED), "--tasks",
                 "sms_spam,oasst1_en", "--limit", "2", "--batch-size", "2", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["sms_spam", "oasst1_en"]
    assert all(r["batched"] > 0 and r["one_at_a_time"] > 0 for r in rows)
    assert "speed-up" in capsys.readouterr().out
    for bad in (["--limit", "0"], ["--limit", "-1"], ["--batch-size", "0"], ["--batch-size", "1"]):
        assert main(["bench", "tasks", "--model", str(model_dir), "--data-dir", str(SHARED), *bad]) == 2
        assert "--limit must be at least 1" in capsys.readouterr().err


def test_scoring_forward_buckets_and_cpu_fallback():
    """Widths round up to few buckets (at most 1.5x padding); padding rows and columns leave the real positions'
    hidden states as they are (fp32, exact up to rounding); off CUDA the forward is the eager one."""
    from dsmoe.infer.graphs import HiddenStates, width_bucket

    assert [width_bucket(n) for n in (1, 64, 65, 96, 97, 129, 200)] == [64, 64, 96, 96, 128, 192, 256]
    assert all(n <= width_bucket(n) <= max(64, 1.5 * n) for n in range(1, 5000))
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    forward = HiddenStates(model, max_batch=4)
    padded = torch.zeros(4, 64, dtype=torch.long)  # what a graph bucket runs: padding after each sequence
    padded[:3, :11] = ids
    with torch.no_grad():
        assert torch.equal(forward(ids), model(ids, return_hidden=True))
        torch.testing.assert_close(model(padded, return_hidden=True)[:3, :11], model(ids, return_hidden=True),
                                   rtol=1e-5, atol=1e-5)
    assert not forward.graphs
