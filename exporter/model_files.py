"""The small files of the merged model: config.json (vocabulary size and tying updated), generation_config.json and
the tokenizer. Written once, before the merge, into a folder every format reads them from (GGUF builds its vocabulary
from there; the safetensors folder copies them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from exporter.context import Context

# Files that make up a tokenizer. They are taken as one set from a single folder, never mixed: the adapter's set wins
# because training that adds tokens saves the extended tokenizer beside the adapter.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
MODEL_FILES_DIR = ".model-files"

_DTYPE_CONFIG_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def tokenizer_source(adapter_dir: Path, base_dir: Path) -> Path | None:
    for folder in (adapter_dir, base_dir):
        if any((folder / name).is_file() for name in TOKENIZER_MARKERS):
            return folder
    return None


def copy_tokenizer(source: Path | None, folder: Path) -> None:
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)


def merged_config(base_config: dict[str, Any], updates: dict[str, Any], out_dtype: Any) -> dict[str, Any]:
    config = dict(base_config)
    changes = dict(updates)
    # transformers 5 writes "dtype"; older readers look for "torch_dtype". Keep whichever the base used.
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    changes[dtype_key] = _DTYPE_CONFIG_NAMES[str(out_dtype)]
    config.update(changes)
    config.pop("quantization_config", None)  # merged weights are float; a quantized output writes its own
    text_config = config.get("text_config")
    if isinstance(text_config, dict):  # multimodal configs keep the language model's settings here too
        config["text_config"] = {**text_config, **{key: value for key, value in updates.items()
                                                   if key in ("vocab_size", "tie_word_embeddings")
                                                   and key in text_config}}
    return config


def write_model_files(ctx: Context, folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(ctx.merged_config, indent=2, sort_keys=True) + "\n")
    if (ctx.base.path / "generation_config.json").is_file():
        shutil.copyfile(ctx.base.path / "generation_config.json", folder / "generation_config.json")
    copy_tokenizer(ctx.tokenizer_dir, folder)


def copy_model_files(source: Path, folder: Path) -> None:
    for item in source.iterdir():
        shutil.copyfile(item, folder / item.name)


def special_tokens(folder: Path) -> tuple[dict[str, str], str | None]:
    """({"bos_token": "<s>", …}, chat template) from a folder's tokenizer_config.json / chat_template.jinja."""
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    # "bos_token": "<s>" or {"content": "<s>", …}; flags such as "add_bos_token": true are not tokens.
    special = {k: v if isinstance(v, str) else v.get("content", "")
               for k, v in tok_config.items() if k.endswith("_token") and isinstance(v, (str, dict))}
    return special, template if isinstance(template, str) else None


def provenance(ctx: Context) -> dict[str, str]:
    """general.* and lora_export.* keys for file formats that carry metadata (GGUF, ONNX)."""
    from exporter.report import VERSION

    adapter = ctx.adapter
    form = "lora_alpha/sqrt(r) (rsLoRA)" if adapter.use_rslora else "lora_alpha/r"
    return {
        "general.base_model.count": "1",
        "general.base_model.0.name": str(ctx.base.config.get("_name_or_path") or ctx.base.path.name),
        "general.description": f"{ctx.base.path.name} merged with LoRA adapter {adapter.path.name} by lora-export",
        "lora_export.version": VERSION,
        "lora_export.adapter": adapter.path.name,
        "lora_export.merge": f"W' = W + s*(B@A), s = {form} per module, fp32 accumulate"
                             + ("; DoRA magnitude-normalised" if adapter.use_dora else ""),
    }
