"""export: write the merged model. Today: a Hugging Face safetensors folder (sharded, indexed, with config,
generation config, tokenizer and chat template). Everything goes into the staging folder; the runner renames it
into place only after every stage has passed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from converters.safetensors_in import read_header
from converters.safetensors_out import INDEX_NAME, ShardedWriter
from exporter.errors import ExportError, StageCheckError
from exporter.pipeline import Artifact, Context

log = logging.getLogger("lora_export")

# Files that make up a tokenizer. They are taken as one set from a single folder, never mixed: the adapter's set wins
# because training that adds tokens saves the extended tokenizer beside the adapter (peft #2415).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")

_DTYPE_CONFIG_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def tokenizer_source(adapter_dir: Path, base_dir: Path) -> Path | None:
    for folder in (adapter_dir, base_dir):
        if any((folder / name).is_file() for name in TOKENIZER_MARKERS):
            return folder
    return None


def merged_config(ctx: Context) -> dict:
    config = dict(ctx.base.config)
    updates = dict(ctx.config_updates)
    dtype_name = _DTYPE_CONFIG_NAMES[str(ctx.out_dtype)]
    # transformers 5 writes "dtype"; older readers look for "torch_dtype". Keep whichever the base used.
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    updates[dtype_key] = dtype_name
    config.update(updates)
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        for key in ("vocab_size", "tie_word_embeddings"):
            if key in ctx.config_updates and key in text_config:
                config["text_config"] = {**text_config, key: ctx.config_updates[key]}
    return config


def export_safetensors(ctx: Context) -> Artifact:
    folder = ctx.staging
    writer = ShardedWriter(folder, ctx.tensor_specs, ctx.plan.max_shard_size,
                           metadata={"lora_export": "merged"})
    for name, data in ctx.tensor_stream:
        writer.write(name, data)
    writer.close()
    (folder / "config.json").write_text(json.dumps(merged_config(ctx), indent=2, sort_keys=True) + "\n")
    if (ctx.base.path / "generation_config.json").is_file():
        shutil.copyfile(ctx.base.path / "generation_config.json", folder / "generation_config.json")
    source = ctx.tokenizer_dir
    if source is None:
        ctx.note("no tokenizer found beside the adapter or the base: the output has none (parity uses token ids)")
    else:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
        ctx.report["tokenizer_from"] = str(source)
    return Artifact("safetensors", ctx.plan.out, folder)


EXPORTERS: dict[str, Callable[[Context], Artifact]] = {"safetensors": export_safetensors}


class ExportStage:
    name = "export"

    def run(self, ctx: Context) -> None:
        unknown = [f for f in ctx.plan.formats if f not in EXPORTERS]
        if unknown:
            raise ExportError(f"--to {','.join(unknown)}", "is not an export format lora-export has (yet).",
                              f"use one of: {', '.join(EXPORTERS)}.")
        for fmt in ctx.plan.formats:
            ctx.artifacts.append(EXPORTERS[fmt](ctx))

    def check(self, ctx: Context) -> None:
        """Read back what was written: every planned tensor, with its shape and dtype, in the files the index names."""
        folder = ctx.staging
        index_path = folder / INDEX_NAME
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
        else:
            weight_map = {s.name: "model.safetensors" for s in ctx.tensor_specs}
        found = {}
        for file_name in sorted(set(weight_map.values())):
            infos, _, _ = read_header(folder / file_name)
            found.update({name: (info.dtype, info.shape, file_name) for name, info in infos.items()})
        for spec in ctx.tensor_specs:
            got = found.get(spec.name)
            if got is None or got[:2] != (spec.dtype, spec.shape) or weight_map.get(spec.name) != got[2]:
                raise StageCheckError(str(folder), f"tensor '{spec.name}' was not written as planned ({got}).",
                                      "report this as a bug.")
        if len(found) != len(ctx.tensor_specs):
            raise StageCheckError(str(folder), "holds tensors that were not planned.", "report this as a bug.")
