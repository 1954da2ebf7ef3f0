import torch

from dsmoe import load_pretrained, save_pretrained
from dsmoe.cli import main
from dsmoe.presets import PRESETS
from dsmoe.model.transformer import build_model


def test_convert_to_bf16_and_shards(tmp_path, capsys):
    model = build_model(PRESETS["tiny"].replace(vocab_size=64, num_hidden_layers=2))
    save_pretrained(model, tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16",
                 "--max-shard-size", "500KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    out = load_pretrained(tmp_path / "dst")
    assert out.embed_tokens.weight.dtype == torch.bfloat16
    assert out.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    assert (tmp_path / "dst" / "tokenizer.json").is_file()
    assert (tmp_path / "dst" / "model.safetensors.index.json").is_file()


def test_convert_errors_are_one_sentence(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and "Traceback" not in err


def test_convert_keeps_the_chat_template_file_and_the_generation_stop_ids(tmp_path, model_dir):
    """transformers 5 writes the template to chat_template.jinja only; extra stop ids live in
    generation_config.json: the converted folder must chat and stop like the source."""
    import shutil

    from dsmoe.data.tokenizer import Tokenizer

    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    (src / "generation_config.json").write_text('{"eos_token_id": [1, 5]}')
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 0
    before, after = Tokenizer.load(src), Tokenizer.load(tmp_path / "dst")
    assert after.chat_template == before.chat_template and "[{{ m['content'] }}]" in after.chat_template
    assert 5 in after.eos_ids and after.eos_ids == before.eos_ids
