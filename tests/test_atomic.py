"""Atomic writes: the file appears whole under its name, with the mode open() gives a new file."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from dsmoe import build_model, save_pretrained
from dsmoe.atomic import atomic_write, atomic_write_text
from dsmoe.presets import PRESETS


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_safetensors_file_gets_the_mode_of_its_json_neighbours(tmp_path):
    """safetensors >= 0.8 creates its files 0600: a model folder's weights were unreadable to users who could
    read its config.json."""
    atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.ones(2)}, tmp))
    atomic_write_text(tmp_path / "c.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    assert mode(tmp_path / "w.safetensors") == mode(tmp_path / "c.json") == mode(tmp_path / "plain.json")
    assert not list(tmp_path.glob(".*tmp*"))

    model = build_model(PRESETS["tiny"].replace(vocab_size=64, num_hidden_layers=2, hidden_size=64,
                                                moe_intermediate_size=32, intermediate_size=64))
    save_pretrained(model, tmp_path / "model")
    assert mode(tmp_path / "model" / "model.safetensors") == mode(tmp_path / "model" / "config.json")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_copy_keeps_its_sources_mode(tmp_path):
    from dsmoe.atomic import atomic_copy

    source = tmp_path / "script.sh"
    source.write_text("#!/bin/sh\n")
    source.chmod(0o750)
    atomic_copy(source, tmp_path / "copy.sh")
    assert mode(tmp_path / "copy.sh") == 0o750


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc")
def test_the_contents_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """A rename before the data is on the disk can survive a power cut that the data does not."""
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    atomic_write_text(tmp_path / "state.json", "{}")
    assert [kind for kind, _ in events] == ["fsync", "replace"] and events[0][1] == events[1][1]
