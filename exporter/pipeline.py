"""The pipeline: a frozen plan, a shared context, a Stage protocol, a registry, and the runner.

Stages run in order (load → merge → export → parity by default). Each stage has a ``run`` over the shared context
and a ``check`` of its own output; the runner times them, stops at the first failure, and only when every stage has
passed moves the staged outputs into place. Third-party stages register through the entry-point group
``lora_export.stages`` (an entry point names a Stage class or a zero-argument factory).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from converters.safetensors_out import Payload, TensorSpec
from exporter.errors import ExportError, OutputError, ParityError

if TYPE_CHECKING:
    from exporter.adapter import Adapter
    from exporter.base import BaseModel

log = logging.getLogger("lora_export")

ENTRY_POINT_GROUP = "lora_export.stages"
DEFAULT_STAGES: tuple[str, ...] = ("load", "merge", "export", "parity")


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
    formats: tuple[str, ...] = ("safetensors",)
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
    variant: str = ""  # the dtype (safetensors) or GGUF type it was written in
    parity: dict[str, Any] | None = None


@dataclass
class Context:
    """State shared by the stages of one run. Stages read what earlier ones left and add their own."""

    plan: ExportPlan
    base: BaseModel | None = None
    adapter: Adapter | None = None
    device: torch.device = torch.device("cpu")
    out_dtype: torch.dtype | None = None
    staging: Path | None = None  # temporary folder beside the target
    layout: Any = None  # exporter.layout.MergeLayout, set by load
    hf_dir: Path | None = None  # the merged Hugging Face folder (the output itself, or an intermediate in staging)
    tokenizer_dir: Path | None = None  # the folder whose tokenizer files the output carries (adapter's, else base's)
    base_hashes: Any = None  # sha256 of the base shards, computed in the background while the merge runs
    # merge → export: the planned output tensors, then the stream of (name, bytes) in that order
    tensor_specs: list[TensorSpec] = field(default_factory=list)
    tensor_stream: Iterator[tuple[str, Payload]] | None = None
    config_updates: dict[str, Any] = field(default_factory=dict)  # changes to config.json (vocab, tying)
    notes: list[str] = field(default_factory=list)  # things the user must know, shown and written to the report
    artifacts: list[Artifact] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def note(self, text: str) -> None:
        log.warning(text)
        self.notes.append(text)


@runtime_checkable
class Stage(Protocol):
    """A pipeline step: run it over the context, then check what it produced (raise StageCheckError if wrong)."""

    name: str

    def run(self, ctx: Context) -> None: ...

    def check(self, ctx: Context) -> None: ...


class StageRegistry:
    """Stage factories by name. A duplicate registration is an error; a failed lookup lists the known names."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[[], Stage]] = {}

    def register(self, name: str, factory: Callable[[], Stage]) -> None:
        if name in self._factories:
            raise ValueError(f"stage '{name}' is already registered")
        self._factories[name] = factory

    def create(self, name: str) -> Stage:
        if name not in self._factories:
            raise ExportError(f"stage '{name}'", "is not registered.", f"use one of: {', '.join(self.names())}.")
        stage = self._factories[name]()
        if not isinstance(stage, Stage):
            raise ExportError(f"stage '{name}'", "does not implement the Stage protocol (name, run, check).")
        return stage

    def names(self) -> list[str]:
        return sorted(self._factories)


def default_registry() -> StageRegistry:
    """The built-in stages, then any installed through the entry-point group."""
    from exporter.stages import BUILTIN_STAGES

    registry = StageRegistry()
    for stage_class in BUILTIN_STAGES:
        registry.register(stage_class.name, stage_class)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        registry.register(ep.name, ep.load())
    return registry


def _check_output_target(plan: ExportPlan) -> None:
    out = plan.out
    if out.exists() and not out.is_dir():
        raise OutputError(str(out), "exists and is a file.", "choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not plan.overwrite:
        raise OutputError(str(out), "exists and is not empty.", "choose another --out or pass --overwrite.")
    if not out.parent.exists():
        raise OutputError(str(out), f"its parent folder {out.parent} does not exist.", "create it first.")


def _commit(ctx: Context) -> None:
    """Move the staged output into place: rename, so readers never see a half-written folder."""
    assert ctx.staging is not None
    target = ctx.plan.out
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.replaced-{os.getpid()}")
        target.rename(previous)
    ctx.staging.rename(target)
    if previous is not None:
        shutil.rmtree(previous)
    ctx.staging = None


def run_pipeline(plan: ExportPlan, registry: StageRegistry | None = None) -> Context:
    """Run the plan's stages in order. Raises ExportError (and kin) on bad input or a failed check."""
    from exporter.report import write_run_outputs

    _check_output_target(plan)
    registry = registry or default_registry()
    stages = [registry.create(name) for name in plan.stage_names()]
    ctx = Context(plan)
    ctx.staging = plan.out.with_name(f".{plan.out.name}.partial-{os.getpid()}")
    if ctx.staging.exists():
        shutil.rmtree(ctx.staging)
    ctx.staging.mkdir()
    try:
        for stage in stages:
            log.info("stage %s …", stage.name)
            start = time.perf_counter()
            stage.run(ctx)
            stage.check(ctx)
            ctx.timings[stage.name] = time.perf_counter() - start
            log.info("stage %s done in %.2f s", stage.name, ctx.timings[stage.name])
        failed = [a for a in ctx.artifacts if a.parity is not None and not a.parity["passed"]]
        if ctx.hf_dir is not None and ctx.hf_dir != ctx.staging:
            shutil.rmtree(ctx.hf_dir)  # the merged HF folder was only an intermediate for other formats
        write_run_outputs(ctx)
        if failed and not plan.accept_parity_failure:
            # Keep the figures for the user, outside the (discarded) output.
            report_path = plan.out.with_name(f"{plan.out.name}.failed-report.json")
            shutil.copyfile(ctx.staging / "report.json", report_path)
            names = ", ".join(f"{a.format} ({a.parity['failures']})" for a in failed)
            raise ParityError(str(plan.out), f"parity failed for {names}; nothing was written.",
                              f"see {report_path}; pass --accept-parity-failure to keep the output anyway.")
        _commit(ctx)
    finally:
        if ctx.staging is not None and ctx.staging.exists():
            shutil.rmtree(ctx.staging, ignore_errors=True)
    return ctx
