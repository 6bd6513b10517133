"""Reading the small JSON files of a model or adapter folder, checked before use.

Every file is read through here so that a malformed one ends in one InputError naming the file, the field and the
fix, never in a TypeError deep inside the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.errors import InputError


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The file's top-level JSON object; InputError when it is unreadable, not JSON, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(str(path), f"is not UTF-8 text ({e.reason} at byte {e.start}).", fix) from e
    except json.JSONDecodeError as e:
        raise InputError(str(path), f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).", fix) from e
    if not isinstance(data, dict):
        raise InputError(str(path), f"holds a JSON {type(data).__name__}, not an object.", fix)
    return data
