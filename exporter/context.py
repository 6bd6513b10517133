"""What a run is asked to do (a frozen plan) and what its stages share (the context). Stages and formats import this
module, never the pipeline that runs them."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from exporter.combine import METHODS as COMBINE_METHODS
from exporter.combine import CombineSpec

# Formats whose output is an adapter, not a merged model (a delta-space combination has no adapter form)
ADAPTER_FORMATS = ("gguf-lora", "peft")
# Formats that take several adapters without --combine, writing one file per adapter
SEPARATE_ADAPTER_FORMATS = ("gguf-lora",)
from exporter.errors import ExportError
from exporter.hub import REPO_ID

if TYPE_CHECKING:
    from exporter.adapter import Adapter
    from exporter.base import BaseModel
    from exporter.layout import MergeLayout
    from exporter.merge_stream import MergeStream
    from exporter.parity.figures import ArtifactParity

log = logging.getLogger("lora_export")

DEFAULT_STAGES: tuple[str, ...] = ("load", "dequantize", "merge", "export", "parity")


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size), '2GiB' -> 2·2³⁰, or bytes."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    cleaned = text.strip().upper()
    for unit, factor in units.items():
        if cleaned.endswith(unit):
            try:
                return int(float(cleaned[: -len(unit)]) * factor)
            except ValueError:
                break
    if cleaned.isdigit():
        return int(cleaned)
    raise ExportError(f"size '{text}'", "is not a size.", "write it like 5GB, 500MB or 2GiB.")


# Words a Python caller may use for a field, as the CLI spells them; each maps to the one value the plan keeps.
_DTYPE_WORDS = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}
_ON_OFF = {"on": True, "off": False}
_CHOICES = {"device": ("auto", "cpu", "cuda"), "parity_memory": ("auto", "whole", "streamed"),
            "merge_into": ("dequantized", "original")}
_BOOLEANS = ("parity", "overwrite", "allow_pickle", "check_finite", "accept_parity_failure", "progress",
             "require_effect_kept", "private", "create_pr")
_HUB_REPO = re.compile(rf"^{REPO_ID}$")  # org/name, no @revision: what a push names


def _plan_error(field_name: str, value: Any, expected: str) -> ExportError:
    return ExportError(f"ExportPlan({field_name}={value!r})", f"is not {expected}.", f"pass {expected}.")


@dataclass(frozen=True)
class ExportPlan:
    """Everything a run needs to know, fixed before anything runs. Every field is checked when the plan is built
    (a wrong type or value is an ExportError naming the field and what it takes); the CLI's own words are accepted
    where they mean one thing (parity="off", dtype="bf16", formats="safetensors,onnx", max_shard_size="2GB")."""

    base: str | None  # a folder or a Hub id (org/name[@revision]); None: the one the adapter names
    adapter: str
    out: Path
    formats: tuple[str, ...] = ("safetensors",)  # "safetensors", "gguf:q8_0", … (see exporter/formats)
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None keeps the base's
    device: str = "auto"  # auto | cpu | cuda
    parity: bool = True
    overwrite: bool = False
    allow_pickle: bool = False
    max_shard_size: int = 5 * 10**9
    check_finite: bool = True
    accept_parity_failure: bool = False
    max_abs: float | None = None  # parity threshold overrides (None: the declared defaults)
    max_kl: float | None = None
    min_top1: float | None = None
    stages: tuple[str, ...] | None = None  # None: DEFAULT_STAGES (parity dropped when parity is off)
    progress: bool = True
    gguf_pre: str | None = None  # BPE pre-tokenizer name for GGUF when it cannot be identified
    parity_memory: str = "auto"  # auto | whole | streamed: how parity holds a model (see exporter/parity/layerwise.py)
    original_base: str | None = None  # the full-precision model a quantized base was made from
    merge_into: str = "dequantized"  # dequantized | original: which weights a quantized base's adapter is merged into
    min_effect_kept: float = 0.5  # warn when an artifact keeps less of the adapter's effect than this
    require_effect_kept: bool = False  # … and fail parity instead of warning
    push_to: str | None = None  # publish to this Hub repo (and its -GGUF/-ONNX/… siblings: exporter/stages/publish.py)
    private: bool = False  # repos the push creates are private
    push_revision: str | None = None  # the branch pushed to (created from main when missing); None: main
    create_pr: bool = False  # open a pull request instead of committing to the branch
    more_adapters: tuple[str, ...] = ()  # adapters after the first (folders or Hub ids), combined by ``combine``
    combine: CombineSpec | None = None  # how the adapters become one (exporter/combine.py); needed for several

    @property
    def adapters(self) -> tuple[str, ...]:
        return (self.adapter, *self.more_adapters)

    def __post_init__(self) -> None:
        def keep(name: str, value: Any) -> None:  # frozen: normalised values go in through object.__setattr__
            object.__setattr__(self, name, value)

        for name in ("base", "adapter"):
            value = getattr(self, name)
            if name == "base" and value is None:
                continue
            if not isinstance(value, (str, Path)) or not str(value):
                raise _plan_error(name, value, "a folder path or a Hub id (a non-empty str or Path)")
            keep(name, str(value))
        if self.original_base is not None:
            if not isinstance(self.original_base, (str, Path)) or not str(self.original_base):
                raise _plan_error("original_base", self.original_base, "None or a folder path (str or Path)")
            keep("original_base", str(self.original_base))
        if not isinstance(self.out, (str, Path)) or not str(self.out):
            raise _plan_error("out", self.out, "an output folder path (a non-empty str or Path)")
        keep("out", Path(self.out))
        formats = self.formats
        if isinstance(formats, str):  # "safetensors,gguf:q8_0", as --to takes it
            formats = tuple(f.strip() for f in formats.split(",") if f.strip())
        if not isinstance(formats, (tuple, list)) or not formats or not all(isinstance(f, str) for f in formats):
            raise _plan_error("formats", self.formats, "a non-empty tuple of format names such as ('safetensors', "
                              "'gguf:q8_0')")
        keep("formats", tuple(formats))
        if self.dtype is not None:
            word = str(self.dtype).removeprefix("torch.") if isinstance(self.dtype, (str, torch.dtype)) else None
            if word not in _DTYPE_WORDS:
                raise _plan_error("dtype", self.dtype, "None (the base's) or one of float32, bfloat16, float16")
            keep("dtype", _DTYPE_WORDS[word])
        for name in _BOOLEANS:
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() in _ON_OFF:
                keep(name, _ON_OFF[value.lower()])
            elif not isinstance(value, bool):
                raise _plan_error(name, value, "True or False" + (' (or "on" / "off")' if name == "parity" else ""))
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise _plan_error(name, getattr(self, name), "one of " + ", ".join(allowed))
        size = self.max_shard_size
        if isinstance(size, str):
            try:
                size = parse_size(size)
            except ExportError:
                size = None
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise _plan_error("max_shard_size", self.max_shard_size, "a positive number of bytes or a size like '5GB'")
        keep("max_shard_size", size)
        for name, low, high in (("max_abs", 0.0, math.inf), ("max_kl", 0.0, math.inf), ("min_top1", 0.0, 1.0),
                                ("min_effect_kept", -math.inf, 1.0)):
            value = getattr(self, name)
            if value is None and name != "min_effect_kept":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                bounds = f"between {low:g} and {high:g}" if math.isfinite(low) and math.isfinite(high) else \
                    (f"at least {low:g}" if math.isfinite(low) else f"at most {high:g}")
                raise _plan_error(name, value, ("None or " if name != "min_effect_kept" else "") + f"a number {bounds}")
            keep(name, float(value))
        if self.stages is not None:
            if isinstance(self.stages, str) or not all(isinstance(s, str) for s in self.stages):
                raise _plan_error("stages", self.stages, "None or a tuple of stage names")
            keep("stages", tuple(self.stages))
        if self.push_to is not None and not (isinstance(self.push_to, str) and _HUB_REPO.match(self.push_to)):
            raise _plan_error("push_to", self.push_to, "None or a Hub repo id such as 'me/my-model' (no @revision)")
        for name in ("push_revision",):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise _plan_error(name, value, "None or a branch name")
        if self.create_pr and self.push_revision is not None:
            raise _plan_error("create_pr", self.create_pr, "False when push_revision is given (a pull request is "
                              "opened against the default branch)")
        if (self.private or self.create_pr or self.push_revision) and self.push_to is None:
            raise _plan_error("push_to", None, "a Hub repo id when private, push_revision or create_pr is given")
        if self.gguf_pre is not None and not (isinstance(self.gguf_pre, str) and self.gguf_pre):
            raise _plan_error("gguf_pre", self.gguf_pre, "None or a pre-tokenizer name such as 'llama-bpe'")
        more = (self.more_adapters,) if isinstance(self.more_adapters, (str, Path)) else self.more_adapters
        if not isinstance(more, (tuple, list)) or not all(isinstance(a, (str, Path)) and str(a) for a in more):
            raise _plan_error("more_adapters", self.more_adapters, "a tuple of adapter folders or Hub ids")
        keep("more_adapters", tuple(str(a) for a in more))
        if self.combine is not None and not isinstance(self.combine, CombineSpec):
            raise _plan_error("combine", self.combine, "None or an exporter.combine.CombineSpec")
        kept_apart = all(f.split(":")[0] in SEPARATE_ADAPTER_FORMATS for f in self.formats)
        if self.more_adapters and self.combine is None and not kept_apart:
            raise ExportError("--adapter", f"{len(self.adapters)} adapters were given, and a merged model needs a way "
                              "to combine them.", f"pass --combine METHOD (one of {', '.join(COMBINE_METHODS)}; sum "
                              "adds every adapter's change with its --weights), or ask only for formats that keep "
                              f"adapters apart ({', '.join(SEPARATE_ADAPTER_FORMATS)}: one file each).")
        if self.combine is not None:
            self.combine.check(len(self.adapters))
            kept_as_adapter = [f for f in self.formats if f.split(":")[0] in ADAPTER_FORMATS]
            if self.combine.in_delta_space and kept_as_adapter:
                raise ExportError(f"--to {kept_as_adapter[0]}", f"writes an adapter, and --combine {self.combine.method}"
                                  " in delta space makes full-rank changes that no adapter holds.",
                                  "drop it from --to, or combine in adapter space (PEFT's methods, or sum).")

    def stage_names(self) -> tuple[str, ...]:
        if self.stages is not None:
            return self.stages
        return tuple(s for s in DEFAULT_STAGES if self.parity or s != "parity") + (("publish",) if self.push_to else ())


@dataclass
class Artifact:
    """One output of the run: where it is staged, where it lands, and how it fared in parity."""

    format: str
    path: Path  # final location
    staged: Path  # where it is written until the run succeeds
    variant: str = ""  # the dtype (safetensors) or type (GGUF) it was written in
    parity: ArtifactParity | None = None  # set by the parity stage
    details: dict[str, Any] = field(default_factory=dict)  # what its writer measured (bitsandbytes: what survived)


@dataclass(eq=False)
class FormatRequest:
    """One requested output: a format's name (a module of exporter/formats, looked up in its registry) and its
    variant, e.g. gguf + "q8_0", and what the format's pre-flight prepared for its writer (a GGUF plan and vocabulary,
    an ONNX writer holding the traced graph). The export stage hands ``prepared`` to the format's sink and drops it
    here; a run that fails before then aborts whatever of it can be aborted."""

    name: str
    variant: str | None
    prepared: Any = None

    def __str__(self) -> str:
        return f"{self.name}:{self.variant}" if self.variant else self.name

    def same_output(self, other: FormatRequest) -> bool:
        return (self.name, self.variant) == (other.name, other.variant)


@dataclass(frozen=True)
class InputFacts:
    """What load found out about the inputs, for the report: where they are, their hashes, whose tokenizer the output
    carries, the disk space checked, the original base of a quantized one."""

    base: str
    adapter: str
    adapter_sha256: dict[str, str]
    tokenizer_from: str | None = None
    # needed_bytes, free_bytes, and per request planned_bytes (its files) and transient_bytes (its scratch meanwhile)
    disk: dict[str, Any] = field(default_factory=dict)
    original_base: dict[str, str] | None = None  # path, merged_into
    base_hub: dict[str, str | None] | None = None  # repo_id, revision asked for, commit it resolved to (Hub ids)
    adapter_hub: dict[str, str | None] | None = None
    base_card: dict[str, Any] = field(default_factory=dict)  # license, license_name, license_link, base_model


@dataclass(frozen=True)
class ParityOutcome:
    """What parity found beyond each artifact's own figures (those are on the artifacts)."""

    reference: str  # what the artifacts were compared with, in words
    run: dict[str, Any]  # how the models were held (whole or module by module), why, and the peak memory it took
    table: str  # the human table, one row per artifact


@dataclass
class Context:
    """One run. Each stage writes only its own fields (tests/test_layering.py holds them to it) and later stages
    read them; the runner owns staging, timings and the final report.

    load:        formats (each request with what its format's pre-flight prepared), base, original_base, merge_base,
                 adapter, combination, reference_adapters, combined_deltas, separate_adapters, device, out_dtype,
                 layout, config_updates,
                 merged_config, model_files, tokenizer_dir,
                 tokenizer_json (dropped once the formats have read it), base_hashes, inputs
    dequantize:  dequantized (what a bitsandbytes base was presented as)
    merge:       merge (a MergeStream: the merge itself, pulled once by the export stage's writers)
    export:      artifacts
    parity:      parity_mode, parity (and each artifact's figures, artifact.parity)
    publish:     published (runs after the output is in place, from report.json and the output folder)
    runner:      staging, timings, report (report.json as written); anyone: note()
    """

    plan: ExportPlan
    # load
    formats: list[FormatRequest] = field(default_factory=list)
    base: BaseModel | None = None
    original_base: BaseModel | None = None  # --original-base: the full-precision model a quantized base came from
    merge_base: BaseModel | None = None  # --merge-into original: the weights merged into, when not the base's own
    adapter: Adapter | None = None  # several adapters: the one they were combined into (exporter/combine.py)
    combination: dict[str, Any] | None = None  # several adapters: the method, weights, parameters, new rank
    # What parity applies on the fly as the reference: (adapter folder, weight) each, the adapter itself by default;
    # for sum and cat every input adapter with its weight, for the other methods the combined adapter as a folder.
    reference_adapters: list[tuple[Path, float]] = field(default_factory=list)
    # --combine-space delta: the exporter.combine.DeltaCombination the merge and the reference take each ΔW from (the
    # adapter above is then only the union of the adapted modules, for the layout)
    combined_deltas: Any = None
    # several adapters without --combine (formats that keep adapters apart): every one, in --adapter order
    separate_adapters: list[Adapter] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    out_dtype: torch.dtype | None = None
    layout: MergeLayout | None = None
    config_updates: dict[str, Any] = field(default_factory=dict)  # changes to config.json (vocab, tying)
    merged_config: dict[str, Any] = field(default_factory=dict)  # config.json of the merged model
    model_files: Path | None = None  # config.json + generation config + tokenizer of the merged model (no weights)
    tokenizer_dir: Path | None = None  # the folder whose tokenizer the output carries (adapter's, else base's)
    tokenizer_json: dict[str, Any] | None = None  # its tokenizer.json, parsed once; dropped after pre-flight
    base_hashes: Any = None  # sha256 of the base shards, computed in the background while the merge runs
    inputs: InputFacts | None = None
    # dequantize
    dequantized: dict[str, Any] | None = None
    # merge
    merge: MergeStream | None = None
    # export
    artifacts: list[Artifact] = field(default_factory=list)
    # parity
    parity_mode: str = "whole"  # how parity runs transformers models: all weights loaded, or module by module
    parity: ParityOutcome | None = None
    # publish
    published: list[dict[str, Any]] = field(default_factory=list)  # each repository pushed: id, commit, files
    # the runner
    staging: Path | None = None  # temporary folder beside the target; renamed into place on success
    timings: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # report.json as written
    notes: list[str] = field(default_factory=list)  # things the user must know, shown and written to the report

    def note(self, text: str) -> None:
        log.warning(text)
        self.notes.append(text)
