"""Resolving the base model: a local Hugging Face folder, or a model id already in the local HF cache (offline)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.safetensors_in import SafetensorsError, SafetensorsFile, TensorInfo
from exporter.errors import InputError
from exporter.schemas import read_json_object

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def resolve_local_or_cached(spec: str, what: str, marker: str) -> Path:
    """A folder path as given, else a repo id looked up in the local Hugging Face cache without any network."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(spec, f"is a file; the {what} must be a folder.", f"pass the folder that holds {marker}.")
    looks_like_repo_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_repo_id:
        try:
            from huggingface_hub import snapshot_download

            # huggingface_hub reads HF_HUB_CACHE once at import; read it at call time so the setting in force wins.
            cache_dir = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
            return Path(snapshot_download(spec, local_files_only=True, cache_dir=cache_dir))
        except Exception as e:  # huggingface_hub raises several types for "not in cache"
            raise InputError(spec, f"is not a folder and not in the local Hugging Face cache ({type(e).__name__}).",
                             f"download it first (huggingface-cli download {spec}) or pass a local folder; "
                             "lora-export never downloads at run time.") from e
    raise InputError(spec, f"no such folder for the {what}.", f"pass the folder that holds {marker}.")


@dataclass
class BaseModel:
    path: Path
    config: dict[str, Any]
    files: list[SafetensorsFile]
    tensor_file: dict[str, SafetensorsFile] = field(default_factory=dict)  # tensor name -> file holding it

    def info(self, name: str) -> TensorInfo:
        return self.tensor_file[name].info(name)

    def has(self, name: str) -> bool:
        return name in self.tensor_file

    @property
    def tie_word_embeddings(self) -> bool:
        # transformers defaults tie_word_embeddings to True for most architectures when the key is absent.
        text = self.config.get("text_config") or {}
        return bool(self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))

    @property
    def dtype_name(self) -> str | None:
        return self.config.get("dtype") or self.config.get("torch_dtype")


def load_base(spec: str) -> BaseModel:
    path = resolve_local_or_cached(spec, "base model", "config.json and *.safetensors")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(str(config_path), "is missing, so this is not a Hugging Face model folder.",
                         "point --base at the folder written by save_pretrained.")
    config = read_json_object(config_path, "restore the config.json written by save_pretrained.")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise InputError(str(config_path), f"describes a {method}-quantized model; merging into quantized weights "
                         "erases the fine-tune (peft #1043) and dequantization is not built yet.",
                         "merge into the unquantized base model the adapter was trained from.")

    index_path = path / INDEX_NAME
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()), key=lambda n: n)
    elif (path / SINGLE_NAME).is_file():
        names = [SINGLE_NAME]
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        if not shards:
            bins = sorted(p.name for p in path.glob("*.bin"))
            raise InputError(str(path), "holds no *.safetensors weights" + (f" (only {bins[0]}, a pickle)" if bins else "")
                             + ".", "re-save the base with save_pretrained(safe_serialization=True).")
        raise InputError(str(path), f"has shards ({shards[0]}, …) but no {INDEX_NAME}.",
                         "restore the index file that came with the shards (unsloth #2355).")

    files: list[SafetensorsFile] = []
    tensor_file: dict[str, SafetensorsFile] = {}
    for name in names:
        shard_path = path / name
        if not shard_path.is_file():
            raise InputError(str(index_path), f"lists {name}, which does not exist.", "re-download the base model.")
        try:
            shard = SafetensorsFile(shard_path)
        except SafetensorsError as e:
            raise InputError(str(shard_path), f"cannot be read as safetensors ({e}).",
                             "re-download the base model; the file may be truncated.") from e
        files.append(shard)
        for tensor_name in shard.keys():
            tensor_file[tensor_name] = shard
    return BaseModel(path, config, files, tensor_file)
