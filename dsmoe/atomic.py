"""Atomic file writes: write under a temporary name in the same folder, then rename into place, so a crash
never leaves a partial file under the real name (the rename is atomic on POSIX file systems)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` fills a temporary file, which then replaces `target`."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")  # pid: concurrent writers never collide
    try:
        write(str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))


def atomic_copy(source: Path, target: Path) -> None:
    """A copy of `source` (contents and permission bits) that appears under `target` whole or not at all."""
    atomic_write(target, lambda tmp: shutil.copy2(source, tmp))


def replace_folder(new: Path, target: Path) -> None:
    """Rename the finished folder `new` to `target`. An existing `target` is moved aside first and removed after,
    so `target` is at every moment either the old folder or the new one, never a mix."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)
