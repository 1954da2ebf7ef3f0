"""`dsmoe generate` and `dsmoe chat` on a tiny model folder."""

import io
import sys

import pytest

from dsmoe.checkpoint.hf import load_pretrained
from dsmoe.cli import main
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.infer.chat_template import render_chat
from dsmoe.infer.generate import generate
from dsmoe.infer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("single_thread")


def expected_text(path, prompt_ids, max_new_tokens):
    tok = Tokenizer.load(path)
    model = load_pretrained(path).eval()
    ids = generate(model, [prompt_ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                   eos_token_ids=tok.eos_ids)[0]
    return tok.decode(ids)


def test_generate_prints_prompt_and_continuation(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr()
    tok = Tokenizer.load(model_dir)
    assert out.out == "def " + expected_text(model_dir, tok.encode("def "), 12) + "\n"
    assert "12 tokens" in out.err
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == out.out  # streamed text is the same text


def test_streamed_text_ends_its_line_before_the_stats_line(model_dir, monkeypatch):
    """Piped (`dsmoe generate ... --stream 2>&1 | tee`), stdout is block-buffered: its final newline waited
    behind the stats line on stderr, which then read "...text[12 tokens in ...]"."""
    terminal = []

    class BlockBuffered(io.StringIO):
        def flush(self):
            terminal.append(self.getvalue())
            self.seek(0)
            self.truncate()

    class Unbuffered(io.StringIO):
        def write(self, text):
            terminal.append(text)
            return len(text)

    stdout = BlockBuffered()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", Unbuffered())
    assert main(["generate", str(model_dir), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0",
                 "--stream"]) == 0
    stdout.flush()  # what exit does
    text = "".join(terminal)
    assert "\n[12 tokens in " in text


def test_generate_seeded_sampling_repeats(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "def ", "--max-new-tokens", "10", "--seed", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_generate_user_errors(tmp_path, model_dir, capsys):
    (tmp_path / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "mistyped"), "--prompt", "x"]) == 2
    assert "mistyped: no such file or folder; check the path" in capsys.readouterr().err  # not "copy one there"
    assert main(["generate", str(model_dir), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "x", "--max-new-tokens", "5000"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_model_len_below_one_is_one_clear_error(command, value, model_dir, capsys):
    extra = ["--prompt", "x"] if command == "generate" else []
    assert main([command, str(model_dir), *extra, "--max-model-len", value]) == 2
    assert "--max-model-len must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_a_classifier_folder_is_refused_before_loading(command, model_dir, tmp_path, capsys):
    """`dsmoe serve` started on a fine-tuned classifier and answered every request with an error; chat printed
    its prompt first. Refused from config.json alone: this folder has no weights to load."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    config |= {"architectures": ["DeepseekV3ForSequenceClassification"], "num_labels": 2,
               "id2label": {"0": "ham", "1": "spam"}, "label2id": {"ham": 0, "spam": 1}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    extra = ["--prompt", "x"] if command == "generate" else []
    assert main([command, str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert "is a sequence classifier" in err and "Traceback" not in err


def replies_in(out: str) -> list[str]:
    """The REPL's replies, whole: a reply may hold newlines; the REPL's own notices follow it on their lines."""
    replies = []
    for chunk in out.split("assistant> ")[1:]:
        lines = chunk.split("\n")
        while lines and (lines[-1] == "" or lines[-1].startswith(("(history cleared)", "unknown command"))):
            lines.pop()
        replies.append("\n".join(lines))
    return replies


@pytest.mark.parametrize("which", ["template", "fallback"])
def test_chat_repl_keeps_history(which, model_dir, plain_model_dir, capsys, monkeypatch):
    path = model_dir if which == "template" else plain_model_dir
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand more\n/reset\n/bogus\nhello\n/exit\nignored\n"))
    assert main(["chat", str(path), "--max-new-tokens", "6", "--temperature", "0", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    replies = replies_in(out)
    assert len(replies) == 3 and "(history cleared)" in out and "unknown command /bogus" in out
    assert replies[0] == replies[2]  # after /reset the same first message gets the same greedy reply
    tok = Tokenizer.load(path)
    system = {"role": "system", "content": "Be brief."}
    text = render_chat([system, {"role": "user", "content": "hello"}], tok.chat_template, bos_token=tok.bos_token)
    ids = tok.encode(text, add_special_tokens=tok.chat_template is None)
    assert replies[0] == expected_text(path, ids, 6).split("\nUser:")[0].rstrip("\n")
    second = [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": replies[0].strip()},
              {"role": "user", "content": "and more"}]
    ids = tok.encode(render_chat(second, tok.chat_template, bos_token=tok.bos_token),
                     add_special_tokens=tok.chat_template is None)
    assert replies[1] == expected_text(path, ids, 6).split("\nUser:")[0].rstrip("\n")


def test_the_stats_line_keeps_the_first_tokens_wait_apart_from_the_decode_rate():
    from dsmoe.infer.cli import generation_stats

    assert generation_stats(11, 1, 0.0, 2.0, 2.5) == "[11 tokens in 2.50 s: first after 2.00 s, then 20.0 tokens/s]"
    assert generation_stats(3, 3, 0.0, 1.0, 1.0) == "[3 tokens in 1.00 s]"  # one step: no rate after it
    assert generation_stats(0, 0, 0.0, None, 0.5) == "[0 tokens in 0.50 s]"
