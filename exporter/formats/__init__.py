"""The table of output formats. A format is one module here (see base.py for what it declares); the stages loop over
this table, so a new format is one new file plus its converter, registered below."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

from exporter.context import FormatRequest
from exporter.errors import ExportError
from exporter.formats import gguf, gguf_lora, onnx, peft, safetensors
from exporter.formats.base import Format, Sink
from exporter.parity.tolerances import Tolerance
from exporter.registry import Registry

ENTRY_POINT_GROUP = "lora_export.formats"


def add_installed_formats(registry: Registry[Format]) -> None:
    """Formats other packages install through the entry-point group ``lora_export.formats``: each entry point names
    a Format instance, or a class or factory that makes one (as a stage comes from ``lora_export.stages``)."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        fmt = loaded if isinstance(loaded, Format) else loaded()
        if not isinstance(fmt, Format):
            raise ExportError(f"format entry point '{entry.name}' ({entry.value})", "does not give a Format.",
                              "point it at a subclass of exporter.formats.base.Format or an instance of one.")
        registry.register(fmt.name, fmt)


FORMATS: Registry[Format] = Registry("format")
for _module in (safetensors, gguf, gguf_lora, onnx, peft):
    FORMATS.register(_module.FORMAT.name, _module.FORMAT)
add_installed_formats(FORMATS)


def parse_formats(texts: Iterable[str]) -> list[FormatRequest]:
    """'safetensors', 'gguf', 'gguf:q8_0', 'gguf-lora' → requests, in order, duplicates collapsed ('gguf' and
    'gguf:f16' are one). Unknown names and variants are errors that list the valid ones."""
    requests: list[FormatRequest] = []
    for text in texts:
        name, _, variant = text.strip().lower().partition(":")
        if name not in FORMATS:
            raise ExportError(f"--to {text}", "is not an export format.",
                              f"use one of: {', '.join(FORMATS.names())} (gguf takes a type: gguf:q8_0).")
        fmt = FORMATS.get(name)
        variant = variant or fmt.default_variant
        allowed = fmt.variants()
        if variant and variant not in allowed:
            fix = f"use one of: {', '.join(allowed)}." if allowed else f"write --to {name}."
            raise ExportError(f"--to {text}", f"'{variant}' is not a {name} variant." if allowed
                              else f"{name} takes no variant.", fix)
        request = FormatRequest(fmt.name, variant or None)
        if not any(request.same_output(r) for r in requests):
            requests.append(request)
    return requests


def format_of(request: FormatRequest) -> Format:
    """The format a request names."""
    return FORMATS.get(request.name)


def tolerance_table() -> str:
    """Every declared tolerance as a Markdown table (README.md carries it; a test keeps the two in step)."""

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:g}"

    lines = ["| format | variant | max \\|Δlogit\\| | KL(ref‖out) | decisive top-1 | why |", "|---|---|---|---|---|---|"]

    def kl_cell(tol: Tolerance) -> str:
        return cell(tol.max_kl) if tol.broken_kl is None else f"≤ base's + {tol.broken_kl:g}"

    for fmt in FORMATS.values():
        rows = [(variant, tol) for variant, tol in fmt.tolerances.items()]
        rows += [(f"{variant} ({arch})", tol) for (variant, arch), tol in fmt.arch_tolerances.items()]
        for variant, tol in rows:
            reason = tol.reason.replace("|", "\\|")
            lines.append(f"| {fmt.name} | {variant} | {cell(tol.max_abs)} | {kl_cell(tol)} | {cell(tol.min_top1)} "
                         f"| {reason} |")
    return "\n".join(lines)


__all__ = ["FORMATS", "Format", "Sink", "format_of", "parse_formats", "tolerance_table"]
