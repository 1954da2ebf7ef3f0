"""Reading the JSON files users hand to dsmoe (configs, checkpoint state, adapter configs): one clear error that
names the file, what is wrong with it and the fix, never a traceback from the json module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsmoe.errors import UserError


def read_json(file: str | Path, fix: str, error: type[UserError] = UserError, expect: type | None = dict) -> Any:
    """The JSON value in `file`, of type `expect` (None: any); `fix` ends the message of the `error` raised when
    it cannot be read or holds something else."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{file} cannot be read ({e.strerror or e}); {fix}") from None
    except UnicodeDecodeError as e:
        raise error(f"{file} is not valid JSON (not UTF-8: {e.reason}); {fix}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{file} is not valid JSON ({e}); {fix}") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{file} holds a JSON {type(value).__name__}, not {'an object' if expect is dict else expect}; "
                    f"{fix}")
    return value
