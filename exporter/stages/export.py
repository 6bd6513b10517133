"""export: write the merged model in each format asked for.

The merged Hugging Face folder is always written first (the merge streams into it; a model larger than memory has no
other place to be). It is an artifact when ``safetensors`` is asked for, else an intermediate in the staging folder,
removed before the output is committed. GGUF files are converted from it; a GGUF LoRA comes from the adapter itself.
Everything lands in the staging folder; the runner renames it into place only after every stage has passed.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from converters.safetensors_in import read_header
from converters.safetensors_out import INDEX_NAME, Payload, ShardedWriter
from exporter.errors import ExportError, InputError, StageCheckError
from exporter.pipeline import Artifact, Context

log = logging.getLogger("lora_export")

# Files that make up a tokenizer. They are taken as one set from a single folder, never mixed: the adapter's set wins
# because training that adds tokens saves the extended tokenizer beside the adapter (peft #2415).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
INTERMEDIATE_DIR = ".merged-hf"
DEFAULT_GGUF_TYPE = "f16"

_DTYPE_CONFIG_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


@dataclass(frozen=True)
class FormatSpec:
    kind: str  # safetensors | gguf | gguf-lora
    variant: str | None = None  # gguf type name

    def __str__(self) -> str:
        return f"{self.kind}:{self.variant}" if self.variant else self.kind


def parse_formats(formats: tuple[str, ...]) -> list[FormatSpec]:
    """'safetensors', 'gguf', 'gguf:q8_0', 'gguf-lora' → specs; unknown names and types are errors listing the valid."""
    specs = []
    for text in formats:
        kind, _, variant = text.strip().lower().partition(":")
        if kind not in EXPORTERS:
            raise ExportError(f"--to {text}", "is not an export format.",
                              f"use one of: {', '.join(EXPORTERS)} (gguf takes a type: gguf:q8_0).")
        if kind == "gguf":
            from converters.gguf.types import GGUF_TYPES  # imported only when asked for: gguf costs ~0.15 s

            variant = variant or DEFAULT_GGUF_TYPE
            if variant not in GGUF_TYPES:
                raise ExportError(f"--to {text}", f"'{variant}' is not a GGUF type.",
                                  f"use one of: {', '.join(GGUF_TYPES)}.")
        elif variant:
            raise ExportError(f"--to {text}", f"{kind} takes no type.", f"write --to {kind}.")
        specs.append(FormatSpec(kind, variant or None))
    if len(set(specs)) != len(specs):
        raise ExportError(f"--to {','.join(formats)}", "names a format twice.", "list each once.")
    return specs


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


def merged_config(ctx: Context) -> dict:
    config = dict(ctx.base.config)
    updates = dict(ctx.config_updates)
    dtype_name = _DTYPE_CONFIG_NAMES[str(ctx.out_dtype)]
    # transformers 5 writes "dtype"; older readers look for "torch_dtype". Keep whichever the base used.
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    updates[dtype_key] = dtype_name
    config.update(updates)
    text_config = config.get("text_config")
    if isinstance(text_config, dict):  # multimodal configs keep the language model's settings here too
        config["text_config"] = {**text_config, **{key: value for key, value in ctx.config_updates.items()
                                                   if key in ("vocab_size", "tie_word_embeddings")
                                                   and key in text_config}}
    return config


def _write_overlapped(writer: ShardedWriter, stream: Iterator[tuple[str, Payload]]) -> None:
    """Write tensor i on a second thread while tensor i+1 is merged (file writes release the GIL). At most two
    tensors wait in the queue, so memory stays at a few tensors."""
    pending: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def work() -> None:
        while (item := pending.get()) is not None:
            if not failure:  # after a failure keep draining, so the producer never blocks on a full queue
                try:
                    writer.write(*item)
                except BaseException as e:  # handed to the main thread below
                    failure.append(e)

    thread = threading.Thread(target=work, name="lora-export-writer", daemon=True)
    thread.start()
    try:
        for item in stream:
            if failure:
                break
            pending.put(item)
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]


def write_hf_folder(ctx: Context, folder: Path) -> None:
    """Consume the merge stream into a Hugging Face folder: shards, index, config, generation config, tokenizer."""
    folder.mkdir(exist_ok=True)
    writer = ShardedWriter(folder, ctx.tensor_specs, ctx.plan.max_shard_size, metadata={"lora_export": "merged"})
    _write_overlapped(writer, ctx.tensor_stream)
    writer.close()
    (folder / "config.json").write_text(json.dumps(merged_config(ctx), indent=2, sort_keys=True) + "\n")
    if (ctx.base.path / "generation_config.json").is_file():
        shutil.copyfile(ctx.base.path / "generation_config.json", folder / "generation_config.json")
    if ctx.tokenizer_dir is None:
        ctx.note("no tokenizer found beside the adapter or the base: the output has none (parity uses token ids)")
    copy_tokenizer(ctx.tokenizer_dir, folder)
    ctx.report["tokenizer_from"] = str(ctx.tokenizer_dir) if ctx.tokenizer_dir else None


def provenance(ctx: Context) -> dict[str, str]:
    """general.* and lora_export.* keys for file formats that carry metadata (GGUF)."""
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


def export_safetensors(ctx: Context, spec: FormatSpec) -> Artifact:
    return Artifact("safetensors", ctx.plan.out, ctx.hf_dir, variant=str(ctx.out_dtype).replace("torch.", ""))


def export_gguf(ctx: Context, spec: FormatSpec) -> Artifact:
    from converters.gguf.writer import write_gguf

    file_name = f"model-{spec.variant.upper()}.gguf"
    total = sum(s.nbytes for s in ctx.tensor_specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"gguf {spec.variant}", disable=not ctx.plan.progress,
              leave=False) as bar:
        result = write_gguf(ctx.hf_dir, ctx.staging / file_name, spec.variant, metadata=provenance(ctx),
                            pre_tokenizer=ctx.plan.gguf_pre, on_bytes=bar.update, device=str(ctx.device))
    for note in result.notes:
        ctx.note(note)
    _write_modelfile(ctx, file_name, spec)
    return Artifact("gguf", ctx.plan.out / file_name, ctx.staging / file_name, variant=spec.variant)


def _write_modelfile(ctx: Context, gguf_name: str, spec: FormatSpec) -> None:
    from converters.gguf.modelfile import modelfile

    config_path = ctx.hf_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = tok_config.get("chat_template")
    if template is None and (ctx.hf_dir / "chat_template.jinja").is_file():
        template = (ctx.hf_dir / "chat_template.jinja").read_text()
    # "bos_token": "<s>" or {"content": "<s>", …}; flags such as "add_bos_token": true are not tokens.
    special = {k: v if isinstance(v, str) else v.get("content", "")
               for k, v in tok_config.items() if k.endswith("_token") and isinstance(v, (str, dict))}
    text, notes = modelfile(gguf_name, template if isinstance(template, str) else None, special,
                            [special.get("eos_token", "")])
    for note in notes:
        ctx.note(note)
    n_gguf = sum(1 for f in ctx.plan.formats if f.startswith("gguf") and not f.startswith("gguf-lora"))
    name = "Modelfile" if n_gguf == 1 else f"Modelfile.{spec.variant}"
    (ctx.staging / name).write_text(text)


def export_gguf_lora(ctx: Context, spec: FormatSpec) -> Artifact:
    from converters.gguf.lora import LoraPair, write_gguf_lora

    adapter = ctx.adapter
    refusals = []
    if adapter.use_dora:
        refusals.append("DoRA (llama.cpp's LoRA has no magnitude vector)")
    if adapter.replacements:
        refusals.append(f"modules_to_save ({', '.join(sorted(adapter.replacements))})")
    if any(m.kind == "embedding" for m in adapter.modules.values()):
        refusals.append("embedding LoRA")
    if any(m.b_bias_key for m in adapter.modules.values()):
        refusals.append("lora_bias")
    if refusals:
        raise InputError(str(adapter.path), f"uses {', '.join(refusals)}, which a GGUF LoRA cannot express.",
                         "export the merged model instead: --to gguf.")
    pairs = [LoraPair(m.weight_name, adapter.tensor(m.a_key), adapter.tensor(m.b_key), m.scale)
             for m in adapter.modules.values()]
    target = ctx.staging / "adapter.gguf"
    write_gguf_lora(ctx.base.config, pairs, target, metadata=provenance(ctx))
    return Artifact("gguf-lora", ctx.plan.out / "adapter.gguf", target, variant="f32")


EXPORTERS: dict[str, Callable[[Context, FormatSpec], Artifact]] = {
    "safetensors": export_safetensors,
    "gguf": export_gguf,
    "gguf-lora": export_gguf_lora,
}


def check_formats_early(ctx: Context) -> None:
    """Everything about the formats that can be refused before the merge: names, types, architecture, K-quants."""
    specs = parse_formats(ctx.plan.formats)
    if any(s.kind.startswith("gguf") for s in specs):
        from converters.gguf.arch import ArchError, arch_for

        try:
            arch_for(ctx.base.config)
        except ArchError as e:
            raise InputError(str(ctx.base.path / "config.json"), f"{e}.", "export safetensors instead.") from e
    for spec in specs:
        if spec.kind == "gguf":
            from converters.gguf.types import GGUF_TYPES
            from converters.gguf.writer import GGUFExportError, require_llama_cpp

            if GGUF_TYPES[spec.variant].weight_type is None:
                try:
                    require_llama_cpp(spec.variant)
                except GGUFExportError as e:
                    raise ExportError(f"--to {spec}", f"{e}.") from e


class ExportStage:
    name = "export"

    def run(self, ctx: Context) -> None:
        specs = parse_formats(ctx.plan.formats)
        wants_hf = any(s.kind == "safetensors" for s in specs)
        ctx.hf_dir = ctx.staging if wants_hf else ctx.staging / INTERMEDIATE_DIR
        write_hf_folder(ctx, ctx.hf_dir)
        from converters.gguf.arch import ArchError
        from converters.gguf.vocab import VocabError
        from converters.gguf.writer import GGUFExportError

        for spec in specs:
            try:
                ctx.artifacts.append(EXPORTERS[spec.kind](ctx, spec))
            except (ArchError, VocabError, GGUFExportError) as e:
                raise ExportError(f"--to {spec}", f"{e}.") from e

    def check(self, ctx: Context) -> None:
        """Read back the HF folder: every planned tensor, with its shape and dtype, in the files the index names."""
        folder = ctx.hf_dir
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
        for artifact in ctx.artifacts:
            if not artifact.staged.exists():
                raise StageCheckError(str(artifact.staged), "was not written.", "report this as a bug.")
