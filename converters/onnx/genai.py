"""genai_config.json for onnxruntime-genai, from the HF config and generation_config.

Field names and defaults follow onnxruntime-genai 0.18's own builder (models/builders/base.py make_genai_config).
``past_present_share_buffer`` is false because our graph returns present = concat(past, new) (a growing cache), not a
fixed-size buffer updated in place; sliding-window layers keep the full past, so no ``sliding_window`` section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from converters.onnx.arch import (ARCHITECTURES, ATTENTION_MASK, INPUT_IDS, LOGITS, PAST_KEY, PAST_VALUE,
                                  POSITION_IDS, PRESENT_KEY, PRESENT_VALUE)
from converters.onnx.errors import OnnxExportError
from converters.onnx.writer import MODEL_FILE

GENAI_CONFIG = "genai_config.json"


def _first(key: str, *sources: dict[str, Any], default: Any = None) -> Any:
    for source in sources:
        if source.get(key) is not None:
            return source[key]
    return default


def genai_config(config: dict, generation_config: dict | None = None, *, filename: str = MODEL_FILE) -> dict:
    """The genai_config dict for a graph written by OnnxWriter with its KV cache (the default)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise OnnxExportError(f"architecture {model_type}: no onnxruntime-genai model type is known for it (known: "
                              f"{', '.join(ARCHITECTURES)}); the ONNX graph runs in ONNX Runtime, but not in genai")
    gen = dict(generation_config or {})
    heads = config["num_attention_heads"]
    context = _first("max_position_embeddings", config, default=4096)
    eos = _first("eos_token_id", gen, config)
    if eos is None:
        raise OnnxExportError("neither generation_config nor config.json names an eos_token_id; genai would never "
                              "stop generating")
    pad = _first("pad_token_id", gen, config, default=eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": _first("bos_token_id", gen, config),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": config.get("head_dim") or config["hidden_size"] // heads,
                "hidden_size": config["hidden_size"],
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                           "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
                "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "num_attention_heads": heads,
                "num_hidden_layers": config["num_hidden_layers"],
                "num_key_value_heads": config.get("num_key_value_heads") or heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": ARCHITECTURES[model_type].genai_type,
            "vocab_size": config["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": gen.get("num_beams") or 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": gen.get("repetition_penalty") or 1.0,
            "temperature": gen.get("temperature") or 1.0,
            "top_k": gen.get("top_k") or 50,
            "top_p": gen.get("top_p") or 1.0,
        },
    }


def _check_graph(model_path: Path, decoder: dict) -> None:
    """The cache geometry genai will allocate must be the graph's (configs name kv heads in several ways)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    past = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input
            if v.name.startswith(PAST_KEY.split("%")[0])}
    if not past:
        raise OnnxExportError(f"{model_path} has no KV-cache inputs; onnxruntime-genai runs the KV-cache graph only")
    want = [decoder["num_key_value_heads"], decoder["head_size"]]
    have = past.get(PAST_KEY % 0, [0, 0, 0, 0])
    if len(past) != 2 * decoder["num_hidden_layers"] or [have[1], have[3]] != want:
        raise OnnxExportError(f"{model_path}: {len(past) // 2} cache layers of (kv_heads, head_dim) = "
                              f"{(have[1], have[3])}, but the config says {decoder['num_hidden_layers']} layers of "
                              f"{tuple(want)}")


def write_genai_config(folder: Path, config: dict, generation_config: dict | None = None, *,
                       filename: str = MODEL_FILE) -> Path:
    """Write ``folder/genai_config.json``, checked against ``folder/filename`` when that exists; onnxruntime-genai
    also needs the tokenizer files in that folder."""
    result = genai_config(config, generation_config, filename=filename)
    if (Path(folder) / filename).exists():
        _check_graph(Path(folder) / filename, result["model"]["decoder"])
    path = Path(folder) / GENAI_CONFIG
    path.write_text(json.dumps(result, indent=4) + "\n")
    return path
