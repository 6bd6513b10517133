"""report.json and the model card."""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime, timezone
from typing import Any

from exporter.parity.figures import format_table

log = logging.getLogger("lora_export")
VERSION = "0.1.0"


def _merge_summary(ctx: Any) -> dict[str, Any]:
    merged = ctx.merge.statistics() if ctx.merge is not None else []
    adapter = ctx.adapter
    scales = sorted({round(m["scale"], 8) for m in merged if m["scale"] is not None})
    return {
        "lora_modules": len(merged),
        "replaced_tensors": sorted(adapter.replacements) if adapter else [],
        "use_rslora": adapter.use_rslora if adapter else None,
        "use_dora": adapter.use_dora if adapter else None,
        "scales": scales,
        "max_relative_change": max((m["relative_change"] for m in merged), default=0.0),
        "unchanged_tensors": [m["tensor"] for m in merged if m["unchanged"]],
        "per_tensor": merged,
    }


# Plan fields that do not change what is built: where it goes, how it is shown, and where it is published.
_NOT_BUILD = ("out", "overwrite", "progress", "push_to", "private", "push_revision", "create_pr")


def request_fingerprint(plan: Any) -> dict[str, Any]:
    """What was asked to be built, as report.json keeps it: the same command run again (say, to resume a push that
    died midway) finds the output it already built and does not rebuild it."""
    asked = {k: v for k, v in dataclasses.asdict(plan).items() if k not in _NOT_BUILD}
    return json.loads(json.dumps(asked, default=str))  # as report.json reads back: tuples nested in combine are lists


def build_report(ctx: Any) -> dict[str, Any]:
    """report.json, from what each stage handed on (exporter/context.py's Context says which stage wrote what)."""
    hashes = ctx.base_hashes.wait() if ctx.base_hashes is not None else {}
    inputs = ctx.inputs
    requantize = {a.variant: a.details["requantize"] for a in ctx.artifacts if "requantize" in a.details}
    return {
        "lora_export_version": VERSION,
        "request": request_fingerprint(ctx.plan),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": (dataclasses.asdict(inputs) if inputs else {}) | {"base_sha256": hashes},
        "output_dtype": str(ctx.out_dtype).replace("torch.", "") if ctx.out_dtype else None,
        "device": str(ctx.device),
        "config_updates": ctx.config_updates,
        "notes": ctx.notes,
        "combination": ctx.combination,
        "merge": _merge_summary(ctx),
        "artifacts": [
            {"format": a.format, "variant": a.variant, "path": str(a.path),
             "parity": a.parity.to_report() if a.parity else None}
            for a in ctx.artifacts
        ],
        "dequantize": ctx.dequantized,
        "requantize": requantize or None,
        "parity_reference": ctx.parity.reference if ctx.parity else None,
        "parity_run": ctx.parity.run if ctx.parity else None,
        "timings_s": {k: round(v, 3) for k, v in ctx.timings.items()},
    }


def model_card(report: dict[str, Any]) -> str:
    inputs, merge = report["inputs"], report["merge"]
    scale_form = "lora_alpha/sqrt(r) (rsLoRA)" if merge["use_rslora"] else "lora_alpha/r"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [lora-export, merged-lora]",
        "---",
        "",
        "# Merged model",
        "",
        f"Produced by lora-export {report['lora_export_version']} on {report['created']}.",
        "",
        f"- **Base model:** `{inputs.get('base')}`",
        f"- **Adapter:** `{inputs.get('adapter')}`",
        f"- **Weights dtype:** {report['output_dtype']}",
        "",
        "## Merge",
        "",
        f"Each adapted weight is W' = W + s·(B @ A) with s = {scale_form}, read per module "
        "(rank_pattern/alpha_pattern honoured), accumulated in float32 and cast once."
        + (" DoRA modules: W' = m / ||W + s·BA||_row * (W + s·BA)." if merge["use_dora"] else ""),
        "",
        f"- LoRA modules merged: {merge['lora_modules']}; scales used: {', '.join(f'{s:g}' for s in merge['scales'])}",
        f"- Replaced tensors (modules_to_save): {', '.join(merge['replaced_tensors']) or 'none'}",
        f"- Largest relative change ||ΔW||/||W||: {merge['max_relative_change']:.3g}",
    ]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "## Parity against base + adapter (unmerged, float32)", ""]
    if report.get("parity_reference"):
        lines += [f"Reference: {report['parity_reference']}.", ""]
    rows = [a["parity"] for a in report["artifacts"] if a["parity"]]
    if rows:
        lines += ["```", format_table(rows), "```"]
    else:
        lines.append("Parity was not run.")
    lines += ["", "## Provenance", "", "| file | sha256 |", "|---|---|"]
    for name, digest in {**inputs.get("adapter_sha256", {}), **inputs.get("base_sha256", {})}.items():
        lines.append(f"| {name} | `{digest}` |")
    return "\n".join(lines) + "\n"


def write_run_outputs(ctx: Any) -> dict[str, Any]:
    """report.json and README.md (model card) into the staging folder."""
    report = build_report(ctx)
    (ctx.staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (ctx.staging / "README.md").write_text(model_card(report))
    return report
