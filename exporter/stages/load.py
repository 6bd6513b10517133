"""load: resolve base and adapter, read every scale, and check that they belong together before anything is written."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from exporter.adapter import load_adapter
from exporter.base import BaseModel, load_base
from exporter.context import Context, InputFacts
from exporter.errors import ExportError, FileSystemError, InputError, MismatchError, StageCheckError
from exporter.formats import format_of, parse_formats
from exporter.hub import HUB_FILE_LIMIT, card_metadata, fetch_adapter, fetch_base, parse_hub_ref, sha256_file
from exporter.layout import Source, build_layout, refuse_quantized_conv1d
from exporter.model_files import MODEL_FILES_DIR, merged_config, tokenizer_source, write_model_files
from exporter.schemas import check_tokenizer_config, tokenizer_json_ids

log = logging.getLogger("lora_export")

_CARD_KEYS = ("license", "license_name", "license_link", "base_model")  # what published cards repeat of the base's

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def choose_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda", "was asked for but no CUDA device is available.",
                          "use --device auto or --device cpu.")
    if requested not in ("cpu", "cuda"):
        raise ExportError(f"--device {requested}", "is not a device.", "use auto, cpu or cuda.")
    return torch.device(requested)


def choose_dtype(requested: str | None, base: BaseModel) -> torch.dtype:
    """--dtype, else the base's torch_dtype in config.json, else its first float tensor's dtype (else float32)."""
    name = requested or base.dtype_name
    if name is None:
        return next((t.torch_dtype for t in base.tensors.values() if t.torch_dtype.is_floating_point), torch.float32)
    if name not in _DTYPES:
        raise ExportError(f"dtype '{name}'", "is not supported for the merged weights.",
                          "use float32, bfloat16 or float16.")
    return _DTYPES[name]


class _BackgroundHashes:
    """sha256 of the base shards, computed on another thread while the merge runs (hashlib releases the GIL)."""

    def __init__(self, paths: list[Path]) -> None:
        self.result: dict[str, str] = {}
        self._thread = threading.Thread(target=self._work, args=(paths,), daemon=True)
        self._thread.start()

    def _work(self, paths: list[Path]) -> None:
        for p in paths:
            self.result[p.name] = sha256_file(p)

    def wait(self) -> dict[str, str]:
        self._thread.join()
        return self.result


class LoadStage:
    name = "load"

    def run(self, ctx: Context) -> None:
        plan = ctx.plan
        ctx.formats = parse_formats(plan.formats)  # a typo in --to costs nothing
        adapters, adapter_hubs = [], []
        for spec in plan.adapters:
            adapter_dir, adapter_hub = fetch_adapter(spec, plan.allow_pickle, plan.progress)
            adapters.append(load_adapter(adapter_dir, allow_pickle=plan.allow_pickle))
            adapter_hubs.append(adapter_hub)
        ctx.adapter, adapter_hub = adapters[0], adapter_hubs[0]
        base_dir, base_hub = fetch_base(self._base_spec(ctx), plan.progress)
        ctx.base = load_base(base_dir)
        refuse_quantized_conv1d(ctx.base)
        ctx.reference_adapters = [(ctx.adapter.path, 1.0)]
        if plan.combine is not None:
            self._combine(ctx, adapters)
        elif len(adapters) > 1:  # formats that keep them apart: each written and checked on its own
            ctx.separate_adapters = adapters
        ctx.device = choose_device(plan.device)
        ctx.out_dtype = choose_dtype(plan.dtype, ctx.base)
        for other in ctx.separate_adapters[1:]:
            build_layout(ctx.base, other, ctx.out_dtype)  # each must fit the base: one clear error if not
        layout = build_layout(ctx.base, ctx.adapter, ctx.out_dtype)
        ctx.layout = layout
        ctx.config_updates.update(layout.config_updates)
        for note in layout.notes:
            ctx.note(note)
        adapter_sha256 = {(a.weights_file.name if len(adapters) == 1 else f"{a.path.name}/{a.weights_file.name}"):
                          sha256_file(a.weights_file) for a in adapters}
        self._check_tokenizer(ctx)
        original = self._original_base(ctx)
        ctx.merged_config = merged_config(ctx.base.config, ctx.config_updates, ctx.out_dtype)
        ctx.model_files = ctx.staging / MODEL_FILES_DIR
        write_model_files(ctx, ctx.model_files)
        if "parity" in plan.stage_names():
            self._check_transformers_knows(ctx)
        # Everything each format needs is checked now, before the merge: a refusal costs seconds, not the merge.
        # Each format gets all its variants at once (a GGUF vocabulary serves every type); what it prepared stays
        # with each request until the export stage opens its writer.
        for name in dict.fromkeys(request.name for request in ctx.formats):
            requests = [request for request in ctx.formats if request.name == name]
            prepared = format_of(requests[0]).preflight(ctx, [request.variant for request in requests])
            for request, ready in zip(requests, prepared, strict=True):
                request.prepared = ready
        disk = self._check_disk_space(ctx)
        ctx.inputs = InputFacts(str(ctx.base.path), str(ctx.adapter.path), adapter_sha256,
                                str(ctx.tokenizer_dir) if ctx.tokenizer_dir else None, disk, original,
                                base_hub.as_report() if base_hub else None,
                                adapter_hub.as_report() if adapter_hub else None,
                                {k: v for k, v in card_metadata(ctx.base.path).items() if k in _CARD_KEYS})
        ctx.tokenizer_json = None  # hundreds of MB of Python objects for a large vocabulary: not kept for the merge
        ctx.base_hashes = _BackgroundHashes([f.path for f in ctx.base.files])
        log.info("base %s: %d tensors in %d file(s); adapter: %d LoRA modules, %d replacements; out dtype %s on %s",
                 ctx.base.path, len(ctx.base.tensors), len(ctx.base.files), len(ctx.adapter.modules),
                 len(ctx.adapter.replacements), ctx.out_dtype, ctx.device)

    @staticmethod
    def _combine(ctx: Context, adapters: list) -> None:
        """Several adapters made into one (exporter/combine.py), which the rest of the run merges as it would a single
        adapter. In adapter space the combined adapter is also written as a PEFT folder in staging: for every method
        but sum and cat it is what parity applies on the fly (PEFT's definition of the method); sum and cat are
        checked against every input adapter applied on the fly with its weight, which shares no code with the
        combination. In delta space the merge and the reference take each module's ΔW from one DeltaCombination."""
        from exporter.combine import COMBINED_ADAPTER_DIR, RANDOM, CombineSpec, DeltaCombination, combine_adapters, \
            write_peft_adapter
        from exporter.parity.layerwise import skeleton

        spec = ctx.plan.combine
        if spec.in_delta_space:
            ctx.combined_deltas = DeltaCombination(adapters, spec)
            # the union of the adapted modules (every adapter's own factors side by side): what the layout checks
            ctx.adapter, _ = combine_adapters(adapters, CombineSpec("cat"))
            ctx.combination = ctx.combined_deltas.report()
            ctx.reference_adapters = []
            log.info("%d adapters combined by %s on their full deltas (mergekit's definition)", len(adapters),
                     spec.method)
            return
        # DARE draws its masks in the model's module order, as PEFT does
        order = [name for name, _ in skeleton(ctx.base.path).named_modules()] if spec.method in RANDOM else None
        ctx.adapter, ctx.combination = combine_adapters(adapters, spec, order)
        if spec.method in ("sum", "cat"):
            ctx.reference_adapters = [(a.path, w) for a, w in zip(adapters, spec.resolved_weights(len(adapters)))]
        else:
            folder = write_peft_adapter(ctx.adapter, ctx.combination["rank"], ctx.staging / COMBINED_ADAPTER_DIR)
            ctx.reference_adapters = [(folder, 1.0)]
        log.info("%d adapters combined by %s into one of rank %d", len(adapters), spec.method,
                 ctx.combination["rank"])

    @staticmethod
    def _base_spec(ctx: Context) -> str:
        """--base, else the base the adapter names (base_model_name_or_path); a Hub id that differs from the adapter's
        is worth a warning (the adapter may have been trained on another model), not a refusal: the layout check
        that follows refuses what does not fit."""
        named = ctx.adapter.base_model_name
        if ctx.plan.base is None:
            if not named:
                raise InputError(str(ctx.adapter.path / "adapter_config.json"), "names no base model "
                                 "(base_model_name_or_path), and no --base was given.", "pass --base.")
            log.info("base model: %s (the adapter's base_model_name_or_path)", named)
            return str(named)
        given, theirs = parse_hub_ref(ctx.plan.base), parse_hub_ref(str(named)) if named else None
        if given is not None and theirs is not None and given.repo_id.lower() != theirs.repo_id.lower():
            ctx.note(f"--base {ctx.plan.base} is not the base the adapter names ({named}, its adapter_config.json's "
                     "base_model_name_or_path): check it is the model the adapter was trained on")
        return ctx.plan.base

    @staticmethod
    def _check_tokenizer(ctx: Context) -> None:
        """A tokenizer that can emit ids past the embedding is the classic lost-resize bug (peft #2415)."""
        source = tokenizer_source(ctx.adapter.path, ctx.base.path)
        if source is not None and (source / "tokenizer_config.json").is_file():
            check_tokenizer_config(source / "tokenizer_config.json")
        n_tokens = None
        if source is not None and (source / "tokenizer.json").is_file():
            # Parsed once here; GGUF's vocabulary reads it too during pre-flight (a 33 MB file costs 0.7 s a parse).
            ctx.tokenizer_json, n_tokens = tokenizer_json_ids(source / "tokenizer.json")
        vocab = ctx.layout.config_updates.get("vocab_size") or ctx.layout.base_vocab
        if n_tokens is not None and vocab is not None and n_tokens > vocab:
            raise InputError(str(source / "tokenizer.json"), f"can produce {n_tokens} token ids but the merged model "
                             f"has {vocab} embedding rows.", "save the adapter with the resized embeddings "
                             "(modules_to_save=['embed_tokens', 'lm_head'] or save_embedding_layers=True), or use "
                             "the tokenizer the model was trained with.")
        ctx.tokenizer_dir = source
        if source is None:
            ctx.note("no tokenizer found beside the adapter or the base: the output has none (parity uses token ids)")

    @staticmethod
    def _check_disk_space(ctx: Context) -> dict[str, Any]:
        """Every artifact's size is known from the plan: refuse now, with the figures, what would not fit, rather
        than fail on a full disk an hour into a merge (staging sits beside --out, on the same disk)."""
        sizes = [format_of(request).output_bytes(ctx, request) for request in ctx.formats]
        need = sum(final for final, _ in sizes) + max((transient for _, transient in sizes), default=0) + 2**20
        free = shutil.disk_usage(ctx.staging).free
        if ctx.plan.push_to:
            # GGUF and ONNX weights are one file each: one over the Hub's limit is refused now, not after the merge.
            too_big = [f"{request} ({final / 1e9:.0f} GB)" for request, (final, _) in zip(ctx.formats, sizes)
                       if request.name in ("gguf", "onnx", "gguf-lora") and final >= HUB_FILE_LIMIT]
            if ctx.plan.max_shard_size >= HUB_FILE_LIMIT:
                too_big.append(f"safetensors shards of up to {ctx.plan.max_shard_size / 1e9:.0f} GB")
            if too_big:
                raise InputError(f"--push-to {ctx.plan.push_to}", "the Hub takes files under 50 GB, and these would "
                                 f"be larger: {', '.join(too_big)}.", "choose a smaller GGUF type or --max-shard-size, "
                                 "or push without those formats.")
        if need > free:
            raise FileSystemError(str(ctx.plan.out.parent), f"the output needs {need / 1e9:.2f} GB and the disk has "
                                  f"{free / 1e9:.2f} GB free ({', '.join(map(str, ctx.formats))}).",
                                  "free space on that disk, or write somewhere else (--out).")
        return {"needed_bytes": need, "free_bytes": free,
                "planned_bytes": {str(request): final for request, (final, _) in zip(ctx.formats, sizes)},
                "transient_bytes": {str(request): transient for request, (_, transient) in zip(ctx.formats, sizes)}}

    @staticmethod
    def _original_base(ctx: Context) -> dict[str, str] | None:
        """--original-base: the full-precision model a quantized base was made from, checked here on every tensor's
        name and shape (the dequantize stage re-quantizes its weights against the stored codes); --merge-into original
        merges into its weights (what training saw stays the reference the report measures the cost against)."""
        plan = ctx.plan  # merge_into is one of its two choices: ExportPlan checks that when it is built
        if plan.original_base is None:
            if plan.merge_into == "original":
                raise InputError("--merge-into original", "needs the full-precision model the quantized base was made "
                                 "from.", "pass --original-base PATH.")
            return None
        if ctx.base.quantization is None:
            raise InputError(f"--original-base {plan.original_base}", "is for a quantized --base, and this base is "
                             "not quantized.", "drop --original-base (the base is already full precision).")
        original = load_base(fetch_base(plan.original_base, plan.progress)[0])
        if original.quantization is not None:
            raise InputError(str(original.path / "config.json"), "is itself a quantized model.",
                             "pass the full-precision model the quantized base was made from.")
        problems = [f"'{name}' is missing" for name in ctx.base.tensors if not original.has(name)]
        problems += [f"'{name}' is {original.info(name).shape}, the quantized base's {t.shape}"
                     for name, t in ctx.base.tensors.items() if original.has(name) and original.info(name).shape != t.shape]
        if problems:
            raise MismatchError(str(original.path), f"is not the model {ctx.base.path} was quantized from: "
                                + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
                                + ".", "pass the full-precision model the quantized base was made from.")
        ctx.original_base = original
        if plan.merge_into == "original":
            ctx.merge_base = original
        return {"path": str(original.path), "merged_into": plan.merge_into}

    @staticmethod
    def _check_transformers_knows(ctx: Context) -> None:
        """Parity runs the reference in transformers: an architecture it cannot build is refused before the merge."""
        from transformers import CONFIG_MAPPING

        model_type = ctx.base.config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise InputError(str(ctx.base.path / "config.json"), f"model_type '{model_type}' is not one transformers "
                             "can build, and parity runs the unmerged model in transformers.",
                             "pass --parity off (the merge itself does not need transformers), or upgrade "
                             "transformers.")

    def check(self, ctx: Context) -> None:
        merged = {t.module.name for t in ctx.layout.tensors if t.source is Source.MERGE}
        missing = sorted(set(ctx.adapter.modules) - merged)
        if missing:
            raise StageCheckError(str(ctx.adapter.path), f"LoRA modules with no place in the output: {missing[:5]}.",
                                  "report this as a bug with the adapter_config.json.")
