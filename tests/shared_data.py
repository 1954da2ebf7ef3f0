"""Where the project's shared real data lives (../shared/data beside the repository, README there); a GPU
machine or another layout sets DSMOE_SHARED_DATA. Tests that need it skip with this path in the reason."""

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("DSMOE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SHAKESPEARE = str(SHARED_DATA / "tinyshakespeare.txt")
