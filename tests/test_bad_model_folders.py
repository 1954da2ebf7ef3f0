"""Malformed model folders: `load_pretrained` raises a typed UserError and `generate`, `serve` and `eval` print one
sentence naming the file, what is wrong and the fix, with exit status 2 and no traceback; never an unpickling."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe.checkpoint.hf import load_pretrained, save_pretrained
from dsmoe.cli import main
from dsmoe.errors import UserError

FLOAT_WEIGHT = "model.layers.0.self_attn.o_proj.weight"


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_header(change):
    def edit(folder: Path) -> None:
        header, data = _header(folder / "model.safetensors")
        change(header)
        _write_header(folder / "model.safetensors", header, data)
    return edit


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        file = folder / name
        file.write_text(json.dumps(change(json.loads(file.read_text()))))
    return edit


def _write(name: str, content: bytes):
    return lambda folder: (folder / name).write_bytes(content)


def _truncate(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _pickle(folder: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, folder / "model.safetensors")  # a zip of pickles under the wrong name


def _sharded(edit=None):
    def make(folder: Path) -> None:
        save_pretrained(load_pretrained(folder), folder, max_shard_size="100KB")
        if edit:
            edit(folder)
    return make


def _drop_key_from_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    tensors = load_file(folder / shard)
    del tensors[key]
    save_file(tensors, folder / shard)


# case -> (how the folder is broken, the file the message names, what the message says)
CASES = {
    "empty model.safetensors": (_write("model.safetensors", b""), "model.safetensors", "not a valid safetensors"),
    "truncated model.safetensors": (_truncate, "model.safetensors", "not a valid safetensors"),
    "header claiming 2^62 bytes": (lambda f: (f / "model.safetensors").write_bytes(
        struct.pack("<Q", 2**62) + (f / "model.safetensors").read_bytes()[8:]),
        "model.safetensors", "not a valid safetensors"),
    "huge offsets": (_edit_header(lambda h: h[FLOAT_WEIGHT].update(data_offsets=[0, 2**60])),
                     "model.safetensors", "not a valid safetensors"),
    "bad header JSON": (lambda f: (f / "model.safetensors").write_bytes(
        struct.pack("<Q", 16) + b"{not json at all" + (f / "model.safetensors").read_bytes()[24:]),
        "model.safetensors", "not a valid safetensors"),
    "unknown dtype": (_edit_header(lambda h: h[FLOAT_WEIGHT].update(dtype="Q7")),
                      "model.safetensors", "not a valid safetensors"),
    "integer weights": (_edit_header(lambda h: h[FLOAT_WEIGHT].update(dtype="I32")),
                        "model.safetensors", "dtype I32"),
    "pickle named .safetensors": (_pickle, "model.safetensors", "not a valid safetensors"),
    "key missing from a shard": (_sharded(_drop_key_from_shard), "safetensors", "does not hold"),
    "index not JSON": (_sharded(_write("model.safetensors.index.json", b"{oops")),
                       "model.safetensors.index.json", "not valid JSON"),
    "index without weight_map": (_sharded(_edit_json("model.safetensors.index.json", lambda d: {"metadata": {}})),
                                 "model.safetensors.index.json", "weight_map"),
    "index is a list": (_sharded(_edit_json("model.safetensors.index.json", lambda d: [d])),
                        "model.safetensors.index.json", "not an object"),
    "index points outside the folder": (_sharded(_edit_json("model.safetensors.index.json", lambda d: {
        "weight_map": {k: "../" + v for k, v in d["weight_map"].items()}})),
        "model.safetensors.index.json", "file name"),
    "config.json not JSON": (_write("config.json", b"{"), "config.json", "not valid JSON"),
    "config.json a list": (_edit_json("config.json", lambda c: [c]), "config.json", "not an object"),
    "rope_scaling a string": (_edit_json("config.json", lambda c: {**c, "rope_scaling": "yarn"}),
                              "config.json", "rope_scaling"),
    "hidden_size a string": (_edit_json("config.json", lambda c: {**c, "hidden_size": "64"}),
                             "config.json", "hidden_size.*an integer"),
    "float layer count": (_edit_json("config.json", lambda c: {**c, "num_hidden_layers": 2.0}),
                          "config.json", "num_hidden_layers.*an integer"),
    "nan rope_theta": (_edit_json("config.json", lambda c: {**c, "rope_theta": float("nan")}),  # json writes NaN
                       "config.json", "rope_theta.*finite"),
    "eos_token_id a list of strings": (_edit_json("config.json", lambda c: {**c, "eos_token_id": ["</s>"]}),
                                       "config.json", "eos_token_id.*an integer"),
    "unknown torch dtype": (_edit_json("config.json", lambda c: {**c, "dtype": "load"}), "config.json", "dtype"),
    "absurd vocab_size": (_edit_json("config.json", lambda c: {**c, "vocab_size": 10**15}),
                          "model.safetensors", r"has shape \[320, 64\] but config.json implies \[10{15}, 64\]"),
}


@pytest.fixture(scope="module")
def good_folder(plain_model_dir):
    return plain_model_dir


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("text") / "text.txt"
    file.write_text("def f(x):\n    return x + 1\n" * 20)
    return file


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_model_folder_gets_one_sentence_and_exit_status_2(case, good_folder, text_file, tmp_path, capsys):
    break_it, file_name, what = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    break_it(folder)
    with pytest.raises(UserError, match=what) as raised:
        load_pretrained(folder)
    assert file_name in str(raised.value)
    for argv in (["generate", str(folder), "--prompt", "def", "--max-new-tokens", "2"],
                 ["serve", str(folder), "--port", "1"],
                 ["eval", str(folder), "--data", str(text_file)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert file_name in err, err
