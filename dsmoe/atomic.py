"""Atomic file writes: write under a temporary name in the same folder, flush it to the disk, then rename it
into place, so a crash never leaves a partial file under the real name (the rename is atomic on POSIX file
systems; without the flush a power cut after the rename can leave the new name pointing at unwritten blocks)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

# Read once, at import (single-threaded then): reading the umask means setting it, which would race with
# other threads creating files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
NEW_FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file


def atomic_write(target: Path, write: Callable[[str], None], mode: int | None = NEW_FILE_MODE) -> None:
    """`write(tmp_path)` fills a temporary file, which then replaces `target` with `mode` (default: the mode open()
    gives a new file; None: what `write` left). Some writers create their file private (safetensors >= 0.8
    writes 0600 through its own temporary file), which would leave model.safetensors unreadable to the other
    users of a model folder whose config.json they can read."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")  # pid: concurrent writers never collide
    try:
        write(str(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))


def atomic_copy(source: Path, target: Path) -> None:
    """A copy of `source` (contents and permission bits) that appears under `target` whole or not at all. The bits
    are set after the flush, which reads the copy (a source its owner cannot read would make it unreadable first)."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), mode=stat.S_IMODE(os.stat(source).st_mode))


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
