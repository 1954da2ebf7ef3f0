"""Where the project's shared real data lives (../shared/data beside the repository, README there); a GPU
machine or another layout sets DSMOE_SHARED_DATA. The single-GPU tests need none of it (they train on the built-in corpus); the two-GPU test reads it."""

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("DSMOE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SHAKESPEARE = str(SHARED_DATA / "tinyshakespeare.txt")
