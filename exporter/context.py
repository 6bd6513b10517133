"""What a run is asked to do (a frozen plan) and what its stages share (the context). Stages and formats import this
module, never the pipeline that runs them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from exporter.errors import ExportError

if TYPE_CHECKING:
    from converters.tensor_stream import StreamTensor
    from exporter.adapter import Adapter
    from exporter.base import BaseModel
    from exporter.formats.base import Format
    from exporter.layout import MergeLayout

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


@dataclass(frozen=True)
class ExportPlan:
    """Everything a run needs to know, fixed before anything runs."""

    base: str
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
    parity_memory: str = "auto"  # auto | whole | streamed: how parity holds a model (see exporter/layerwise.py)
    original_base: str | None = None  # the full-precision model a quantized base was made from
    merge_into: str = "dequantized"  # dequantized | original: which weights a quantized base's adapter is merged into
    min_effect_kept: float = 0.5  # warn when an artifact keeps less of the adapter's effect than this
    require_effect_kept: bool = False  # … and fail parity instead of warning

    def stage_names(self) -> tuple[str, ...]:
        if self.stages is not None:
            return self.stages
        return tuple(s for s in DEFAULT_STAGES if self.parity or s != "parity")


@dataclass
class Artifact:
    """One output of the run: where it is staged, where it lands, and how it fared in parity."""

    format: str
    path: Path  # final location
    staged: Path  # where it is written until the run succeeds
    variant: str = ""  # the dtype (safetensors) or type (GGUF) it was written in
    parity: dict[str, Any] | None = None


@dataclass(frozen=True)
class FormatRequest:
    """One requested output: the format (a module of exporter/formats) and its variant, e.g. gguf + "q8_0"."""

    format: Format
    variant: str | None

    def __str__(self) -> str:
        return f"{self.format.name}:{self.variant}" if self.variant else self.format.name


@dataclass
class Context:
    """State shared by the stages of one run. Stages read what earlier ones left and add their own."""

    plan: ExportPlan
    base: BaseModel | None = None
    original_base: BaseModel | None = None  # --original-base: the full-precision model a quantized base came from
    merge_base: BaseModel | None = None  # --merge-into original: the weights merged into, when not the base's own
    adapter: Adapter | None = None
    device: torch.device = torch.device("cpu")
    out_dtype: torch.dtype | None = None
    staging: Path | None = None  # temporary folder beside the target; renamed into place on success
    layout: MergeLayout | None = None  # set by load
    formats: list[FormatRequest] = field(default_factory=list)  # set by load
    merged_config: dict[str, Any] = field(default_factory=dict)  # config.json of the merged model
    model_files: Path | None = None  # config.json + generation config + tokenizer of the merged model (no weights)
    tokenizer_dir: Path | None = None  # the folder whose tokenizer the output carries (adapter's, else base's)
    tokenizer_json: dict[str, Any] | None = None  # its tokenizer.json, parsed once; dropped after pre-flight
    base_hashes: Any = None  # sha256 of the base shards, computed in the background while the merge runs
    tensor_stream: list[StreamTensor] | None = None  # merge → export: every output tensor, once, in order
    format_state: dict[str, Any] = field(default_factory=dict)  # what a format's pre-flight prepared for its writer
    parity_mode: str = "whole"  # how parity runs transformers models: all weights loaded, or module by module
    config_updates: dict[str, Any] = field(default_factory=dict)  # changes to config.json (vocab, tying)
    notes: list[str] = field(default_factory=list)  # things the user must know, shown and written to the report
    artifacts: list[Artifact] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def note(self, text: str) -> None:
        log.warning(text)
        self.notes.append(text)
