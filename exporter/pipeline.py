"""The pipeline: a Stage protocol, the stage registry, and the runner.

Stages run in order (load → dequantize → merge → export → parity by default). Each stage has a ``run`` over the
shared context and a ``check`` of its own output; the runner times them, stops at the first failure, and only when
every stage has passed moves the staged outputs into place. A stage with ``after_commit = True`` (publish) runs
after that, on the output in place, from its report.json; when the output already holds what the same request
built, only those stages run (a push that died midway is resumed by the same command). Third-party stages register
through the entry-point group ``lora_export.stages`` (an entry point names a Stage class or a zero-argument factory).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, runtime_checkable

from exporter.combine import COMBINED_ADAPTER_DIR
from exporter.context import Context, ExportPlan
from exporter.errors import ExportError, FileSystemError, OutputError, ParityError
from exporter.registry import Registry
from exporter.report import request_fingerprint, write_run_outputs
from exporter.stages import BUILTIN_STAGES

log = logging.getLogger("lora_export")

ENTRY_POINT_GROUP = "lora_export.stages"


@runtime_checkable
class Stage(Protocol):
    """A pipeline step: run it over the context, then check what it produced (raise StageCheckError if wrong)."""

    name: str

    def run(self, ctx: Context) -> None: ...

    def check(self, ctx: Context) -> None: ...


class StageRegistry(Registry[Callable[[], Stage]]):
    """Stage factories by name."""

    def __init__(self) -> None:
        super().__init__("stage")

    def create(self, name: str) -> Stage:
        stage = self.get(name)()
        if not isinstance(stage, Stage):
            raise ExportError(f"stage '{name}'", "does not implement the Stage protocol (name, run, check).")
        return stage


def default_registry() -> StageRegistry:
    """The built-in stages, then any installed through the entry-point group."""
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


def _commit(ctx: Context) -> None:
    """Move the staged output into place: rename, so readers never see a half-written folder."""
    assert ctx.staging is not None
    target = ctx.plan.out
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.replaced-{os.getpid()}")
        target.rename(previous)
    try:
        ctx.staging.rename(target)
    except BaseException:
        if previous is not None:  # the old output back where it was: "nothing was written" must stay true
            previous.rename(target)
        raise
    if previous is not None:
        shutil.rmtree(previous)
    ctx.staging = None


class OutputLock:
    """One run per --out at a time: an exclusive lock on .NAME.lock beside it, held for the whole run (the kernel
    drops it when the process ends, however it ends); the holder's pid is written inside to name it."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out.with_name(f".{out.name}.lock")
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(str(self.out), f"is being written by another lora-export run (process {holder}).",
                                  "wait for it to finish, or choose another --out.") from None
            # The holder before us removes the file as it exits: a lock taken on that removed file protects nothing
            # (a third run would create and lock a new one), so lock again until the file we hold is the one at
            # the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _restore_replaced_output(ctx: Context) -> None:
    """A run killed between moving the previous output aside (--overwrite) and moving its own in leaves no --out and
    a .NAME.replaced-PID: put the previous output back, so this run finds what the user had."""
    out = ctx.plan.out
    replaced = sorted(out.parent.glob(f".{out.name}.replaced-*"))
    if replaced and not out.exists():
        replaced[-1].rename(out)
        ctx.note(f"restored {out.name} from {replaced[-1].name}, moved aside by a run that did not finish")


def _remove_stale_staging(ctx: Context) -> None:
    """Staging folders of runs on this --out that did not finish (killed): with the lock held, no other run on it is
    alive, so every one of them is stale."""
    out = ctx.plan.out
    for leftover in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.replaced-*")):
        if leftover != ctx.staging and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            ctx.note(f"removed {leftover.name}, left beside {out.name} by a run that did not finish "
                     f"(process {leftover.name.rsplit('-', 1)[-1]})")


_FIXES = {errno.ENOSPC: "free space on that disk, or write somewhere else (--out).",
          errno.EDQUOT: "free space within your quota, or write somewhere else (--out).",
          errno.EACCES: "check the permissions of that path.", errno.EPERM: "check the permissions of that path.",
          errno.EROFS: "write to a writable disk (--out)."}


def _os_error(error: OSError, ctx: Context) -> ExportError:
    """An operating-system error while the run reads or writes files, as one line naming the path and the cause."""
    path = error.filename or ctx.staging or ctx.plan.out
    code = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else type(error).__name__
    return FileSystemError(str(path), f"{error.strerror or error} ({code}); nothing was written.",
                           _FIXES.get(error.errno, "check that path and the disk it is on."))


def run_pipeline(plan: ExportPlan, registry: StageRegistry | None = None) -> Context:
    """Run the plan's stages in order. Raises ExportError (and kin) on bad input, a failed check, or a file-system
    error; the output appears only when every stage has passed, and nothing is left behind otherwise."""
    if not plan.out.parent.exists():
        raise OutputError(str(plan.out), f"its parent folder {plan.out.parent} does not exist.", "create it first.")
    registry = registry or default_registry()
    stages = [registry.create(name) for name in plan.stage_names()]
    building = [s for s in stages if not getattr(s, "after_commit", False)]
    ctx = Context(plan)
    with OutputLock(plan.out):
        _restore_replaced_output(ctx)
        built = _built_by_this_request(plan)
        if built is not None:
            ctx.report = built
            log.warning("%s already holds what this command builds (its report.json says so): not rebuilding it, "
                        "going on to %s", plan.out, ", ".join(s.name for s in stages if s not in building))
        else:
            _build(ctx, building)
        for stage in stages:  # publishing: on the output in place, after everything else passed
            if stage not in building:
                _run_stage(stage, ctx)
    return ctx


def _built_by_this_request(plan: ExportPlan) -> dict | None:
    """report.json of a finished output of this very request, when the run has work left after the build (a push
    to resume) and --overwrite does not ask for a rebuild; else None."""
    report_path = plan.out / "report.json"
    if plan.overwrite or plan.push_to is None or not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        return None
    return report if report.get("request") == request_fingerprint(plan) else None


def _run_stage(stage: Stage, ctx: Context) -> None:
    log.info("stage %s …", stage.name)
    start = time.perf_counter()
    stage.run(ctx)
    stage.check(ctx)
    ctx.timings[stage.name] = time.perf_counter() - start
    log.info("stage %s done in %.2f s", stage.name, ctx.timings[stage.name])


def _build(ctx: Context, stages: list[Stage]) -> None:
    """The stages that build the output, in a staging folder renamed into place when all of them have passed."""
    plan = ctx.plan
    _check_output_target(plan)
    ctx.staging = plan.out.with_name(f".{plan.out.name}.partial-{os.getpid()}")
    _remove_stale_staging(ctx)
    try:
        ctx.staging.mkdir()
        for stage in stages:
            _run_stage(stage, ctx)
        if ctx.merge is not None and "export" in ctx.timings:
            # The merge runs while the export stage pumps its stream: its time is the merge's, not the export's.
            ctx.timings["merge"] = ctx.timings.get("merge", 0.0) + ctx.merge.seconds
            ctx.timings["export"] -= ctx.merge.seconds
        failed = [a for a in ctx.artifacts if a.parity is not None and not a.parity.passed]
        # The formats' shared input and the combined adapter parity read: inputs, not outputs
        for scratch in (ctx.model_files, ctx.staging / COMBINED_ADAPTER_DIR):
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        ctx.report = write_run_outputs(ctx)
        if failed and not plan.accept_parity_failure:
            # Keep the figures for the user, outside the (discarded) output.
            report_path = plan.out.with_name(f"{plan.out.name}.failed-report.json")
            shutil.copyfile(ctx.staging / "report.json", report_path)
            names = ", ".join(f"{a.format} ({'; '.join(a.parity.failures)})" for a in failed)
            raise ParityError(str(plan.out), f"parity failed for {names}; nothing was written.",
                              f"see {report_path}; pass --accept-parity-failure to keep the output anyway.")
        _commit(ctx)
    except OSError as e:
        raise _os_error(e, ctx) from e
    finally:
        for request in ctx.formats:  # a writer a pre-flight opened, if the run failed before export took it
            if hasattr(request.prepared, "abort"):
                request.prepared.abort()
        if ctx.staging is not None and ctx.staging.exists():
            shutil.rmtree(ctx.staging, ignore_errors=True)
