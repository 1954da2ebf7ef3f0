"""The one reader of user-supplied JSON files: every failure is one error naming the file and the fix."""

import pytest

from dsmoe.checkpoint.peft_adapter import read_adapter_config
from dsmoe.errors import CheckpointError, UserError
from dsmoe.json_files import read_json


@pytest.mark.parametrize("content, expected", [
    (None, "cannot be read"),
    (b"\xff\xfe{", "not valid JSON \\(not UTF-8"),
    (b'{"a": 1', "not valid JSON"),
    (b"[1, 2]", "holds a JSON list, not an object"),
])
def test_each_failure_names_the_file_and_the_fix(tmp_path, content, expected):
    file = tmp_path / "x.json"
    if content is not None:
        file.write_bytes(content)
    with pytest.raises(UserError, match=f"x.json .*{expected}.*; do this"):
        read_json(file, "do this")


def test_expect_none_takes_any_json_value(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    assert read_json(tmp_path / "x.json", "do this", expect=None) == [1, 2]


def test_an_adapter_config_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="adapter_config.json holds a JSON list, not an object"):
        read_adapter_config(tmp_path)
