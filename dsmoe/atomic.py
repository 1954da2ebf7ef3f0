"""Atomic file writes: write under a temporary name in the same folder, then rename into place, so a crash
never leaves a partial file under the real name (the rename is atomic on POSIX file systems)."""

from __future__ import annotations

import os
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
