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
    except RecursionError as e:
        raise InputError(str(path), "nests JSON too deeply to be a configuration file.", fix) from e
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


# -- field types ---------------------------------------------------------------------------------------------------
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return _int(v) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _names(v: Any) -> bool:  # PEFT's target_modules: a list of names or one regex
    return isinstance(v, str) or _str_list(v)


def _check(path: Path, data: dict[str, Any], fields: dict[str, tuple[Any, str]], fix: str) -> None:
    for key, (valid, expected) in fields.items():
        if data.get(key) is not None and not valid(data[key]):
            raise InputError(f"{path} ({key})", f"is {data[key]!r}, not {expected}.", fix)


def _regex_keys(path: Path, field: str, pattern: Any, valid_value: Any, expected: str, fix: str) -> None:
    import re

    if not isinstance(pattern, dict):
        raise InputError(f"{path} ({field})", f"is a JSON {type(pattern).__name__}, not an object.", fix)
    for key, value in pattern.items():
        try:
            re.compile(key)
        except re.error as e:
            raise InputError(f"{path} ({field})", f"key {key!r} is not a regular expression ({e}).", fix) from e
        if not valid_value(value):
            raise InputError(f"{path} ({field})", f"gives {key!r} the value {value!r}, not {expected}.", fix)


ADAPTER_FIELDS = {
    "peft_type": (_str, "a string"), "r": (_positive_int, "a positive integer"),
    "lora_alpha": (_number, "a number"), "use_rslora": (_bool, "true or false"), "use_dora": (_bool, "true or false"),
    "fan_in_fan_out": (_bool, "true or false"), "lora_bias": (_bool, "true or false"),
    "target_modules": (_names, "a list of module names or a regex"),
    "modules_to_save": (_str_list, "a list of module names"),
    "base_model_name_or_path": (_str, "a string"),
}


ADAPTER_NOT_NULL = ("r", "lora_alpha")


def check_adapter_config(path: Path, config: dict[str, Any]) -> None:
    """adapter_config.json's fields that a merge reads, each of the type PEFT writes."""
    fix = "restore the adapter_config.json PEFT wrote with this adapter."
    for key in ADAPTER_NOT_NULL:
        # PEFT fills in an absent r or lora_alpha (8), but keeps a null and then fails to build the layer (None <= 0,
        # None / r): a null is a damaged file, not the default.
        if key in config and config[key] is None:
            raise InputError(f"{path} ({key})", f"is null, not {ADAPTER_FIELDS[key][1]}.", fix)
    _check(path, config, ADAPTER_FIELDS, fix)
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            _regex_keys(path, field, config[field], _positive_int if field == "rank_pattern" else _number,
                        "a positive integer" if field == "rank_pattern" else "a number", fix)


MODEL_FIELDS = {
    "model_type": (_str, "a string"), "architectures": (_str_list, "a list of class names"),
    "tie_word_embeddings": (_bool, "true or false"), "vocab_size": (_positive_int, "a positive integer"),
    "dtype": (_str, "a dtype name"), "torch_dtype": (_str, "a dtype name"),
    "hidden_size": (_positive_int, "a positive integer"), "intermediate_size": (_positive_int, "a positive integer"),
    "num_hidden_layers": (_positive_int, "a positive integer"),
    "num_attention_heads": (_positive_int, "a positive integer"),
    "num_key_value_heads": (_positive_int, "a positive integer"), "head_dim": (_positive_int, "a positive integer"),
    "max_position_embeddings": (_positive_int, "a positive integer"), "rms_norm_eps": (_number, "a number"),
    "rope_theta": (_number, "a number"), "sliding_window": (_int, "an integer"),
    "text_config": (lambda v: isinstance(v, dict), "an object"),
    "quantization_config": (lambda v: isinstance(v, dict), "an object"),
    "rope_scaling": (lambda v: isinstance(v, dict), "an object"),
    "rope_parameters": (lambda v: isinstance(v, dict), "an object"),
}


def check_model_config(path: Path, config: dict[str, Any]) -> None:
    """config.json's fields lora-export and the formats read, each of the type transformers writes."""
    fix = "restore the config.json written by save_pretrained."
    _check(path, config, MODEL_FIELDS, fix)
    if isinstance(config.get("text_config"), dict):
        _check(path, config["text_config"], MODEL_FIELDS, fix)


def _token(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))


TOKENIZER_CONFIG_FIELDS = {
    "tokenizer_class": (_str, "a class name"),
    "chat_template": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(t, dict) and _str(t.get("name")) and _str(t.get("template")) for t in v)),
        "a template or a list of named templates"),
    "add_bos_token": (_bool, "true or false"), "add_eos_token": (_bool, "true or false"),
    "model_max_length": (_number, "a number"),
    **{name: (_token, "a token (a string, or an object with content)")
       for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")},
}


def check_tokenizer_config(path: Path) -> None:
    fix = "restore the tokenizer_config.json saved with the tokenizer (tokenizer.save_pretrained)."
    config = read_json_object(path, fix)
    _check(path, config, TOKENIZER_CONFIG_FIELDS, fix)
    decoder = config.get("added_tokens_decoder")
    if decoder is not None and not (isinstance(decoder, dict) and all(
            isinstance(k, str) and k.isdigit() and isinstance(v, dict) and _str(v.get("content"))
            for k, v in decoder.items())):
        raise InputError(f"{path} (added_tokens_decoder)", "is not an object of token id -> {content: …}.", fix)
