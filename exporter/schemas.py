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


def _field_error(path: Path, field: str, problem: str, fix: str) -> InputError:
    return InputError(f"{path} ({field})", problem, fix)


def tokenizer_json_ids(path: Path) -> tuple[dict[str, Any], int | None]:
    """tokenizer.json parsed and checked where it is used (the vocabulary and the added tokens), and how many token
    ids it can produce (max id + 1; None for an empty vocabulary)."""
    fix = "restore the tokenizer.json the tokenizer was saved with (tokenizer.save_pretrained)."
    data = read_json_object(path, fix)
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise _field_error(path, "model", f"is a JSON {type(model).__name__}, not an object.", fix)
    vocab = model.get("vocab") or {}
    if isinstance(vocab, dict):  # BPE / WordPiece: {piece: id}
        ids = list(vocab.values())
    elif isinstance(vocab, list):  # Unigram: [[piece, score], …], the id is the position
        ids = list(range(len(vocab)))
    else:
        raise _field_error(path, "model.vocab", f"is a JSON {type(vocab).__name__}, not an object or a list.", fix)
    added = data.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise _field_error(path, "added_tokens", "is not a list of token objects.", fix)
    ids += [t.get("id") for t in added]
    bad = [i for i in ids if not (isinstance(i, int) and not isinstance(i, bool) and i >= 0)]
    if bad:
        raise _field_error(path, "model.vocab / added_tokens", f"holds a token id that is not a non-negative integer "
                           f"({bad[0]!r}).", fix)
    return data, (max(ids) + 1 if ids else None)
