"""Text around the engine: incremental detokenization, stop strings, the tokenizer files, chat templates."""

import json

import pytest

from dsmoe.checkpoint.hf import load_pretrained
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.errors import UserError
from dsmoe.infer.chat_template import FALLBACK_STOP, ChatTemplateError, render_chat, stop_strings_for
from dsmoe.infer.engine import Engine
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.text import IncrementalDecoder, StopStrings, TextStream, stream_text

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.load(model_dir)


def test_tokenizer_files(model_dir, tokenizer, chat_template):
    ids = tokenizer.encode("def f(x):")
    assert ids[0] == tokenizer.bos_id == 0 and tokenizer.decode(ids) == "def f(x):"  # add_bos_token: true
    assert tokenizer.eos_ids == (1,) and tokenizer.chat_template == chat_template
    from transformers import AutoTokenizer  # lm-eval loads the folder this way

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    assert hf.decode(hf("naïve — ok").input_ids, skip_special_tokens=True) == "naïve — ok"
    assert hf.eos_token_id == 1


def test_incremental_decoding_matches_full_decode(tokenizer):
    text = "héllo wörld — ünïcödé ✓ 中文 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # small vocabulary: multi-byte characters span several tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push([t]) for t in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # partial characters are held back, never shown


def test_stop_strings_across_chunks():
    stops = StopStrings(["END", "\n\n"])
    assert stops.push("abc E") == ("abc ", False)  # "E" could start "END": held back
    assert stops.push("N") == ("", False)
    assert stops.push("Dtail") == ("", True)
    stops = StopStrings(["END"])
    assert stops.push("aEN") == ("a", False)
    assert stops.push("x") == ("ENx", False)  # not a stop after all: released
    assert StopStrings([]).push("END") == ("END", False)


def test_text_stream_flushes_held_text_at_the_end(tokenizer):
    stream = TextStream(tokenizer, [], ["STOP"])
    ids = tokenizer.encode("abc ST", add_special_tokens=False)
    text = "".join(stream.push([t]) for t in ids[:-1]) + stream.push(ids[-1:], final=True)
    assert text == "abc ST" and not stream.stopped


def test_stream_text_stops_at_a_stop_string(model_dir, tokenizer):
    model = load_pretrained(model_dir).eval()
    params = SamplingParams(max_new_tokens=30, temperature=0)
    prompt = tokenizer.encode("def ")
    full = "".join(d for d, _ in stream_text(Engine(model, max_batch=1, max_model_len=64), tokenizer, prompt, params))
    stop = full[5:8]
    engine = Engine(model, max_batch=1, max_model_len=64)
    results = list(stream_text(engine, tokenizer, prompt, params, [stop]))
    text = "".join(d for d, _ in results)
    assert text == full[: full.index(stop)]
    assert results[-1][1].finish_reason == "stop" and len(results) < 30
    assert not engine.requests  # the request was cancelled, its slot freed
    assert engine.free_slots == [0]


def test_chat_template_renders_in_a_sandbox(chat_template):
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(messages, chat_template, bos_token="<s>") == "<s><|user|>hi\n<|assistant|>"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(messages, "{{ raise_exception('roles must alternate') }}")
    for hostile in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(1) }}",
                    "{{ cycler.__init__.__globals__ }}", "{% for x in range(10**9) %}{% endfor %}"):
        with pytest.raises(ChatTemplateError):
            render_chat(messages, hostile)


def test_fallback_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_chat(messages, None) == "Be brief.\n\nUser: hi\n\nAssistant:"
    assert stop_strings_for(None) == FALLBACK_STOP and stop_strings_for("x") == ()


def test_chat_template_variants(tmp_path, model_dir):
    for name in ("tokenizer.json", "config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "eos_token": "<|eos|>"}))
    assert Tokenizer.load(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.load(tmp_path).chat_template == "J"
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
