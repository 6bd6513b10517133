"""Parity's figures: two sets of logits compared (max |Δlogit|, KL, top-1 raw and on decisive positions), judged
against a declared tolerance, and the human table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from exporter.parity.tolerances import DECISIVE_MARGIN, Tolerance


@dataclass(frozen=True)
class ParityFigures:
    positions: int
    max_abs: float
    kl: float  # mean KL(ref‖out) over positions, nats
    top1: float  # raw agreement over all positions
    top1_decisive: float  # agreement where the reference's top-2 margin ≥ DECISIVE_MARGIN (1.0 if there are none)
    decisive_positions: int


def compare_logits(reference: torch.Tensor, output: torch.Tensor) -> ParityFigures:
    """Compare (positions, vocab) logits. Both are taken to float32 (float64 for the KL sum)."""
    ref = reference.to(torch.float32)
    out = output.to(torch.float32)
    if ref.shape != out.shape:
        raise ValueError(f"logit shapes differ: reference {tuple(ref.shape)}, output {tuple(out.shape)}")
    log_p = torch.log_softmax(ref.double(), dim=-1)
    log_q = torch.log_softmax(out.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).mean()
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= DECISIVE_MARGIN
    agree = ref.argmax(-1) == out.argmax(-1)
    n_decisive = int(decisive.sum())
    return ParityFigures(
        positions=ref.shape[0],
        max_abs=float((ref - out).abs().max()),
        kl=float(kl),
        top1=float(agree.float().mean()),
        top1_decisive=float(agree[decisive].float().mean()) if n_decisive else 1.0,
        decisive_positions=n_decisive,
    )


def judge(figures: ParityFigures, tol: Tolerance) -> list[str]:
    """The failed criteria, as short phrases; empty when the artifact passes."""
    failures = []
    if tol.max_abs is not None and not figures.max_abs <= tol.max_abs:
        failures.append(f"max|Δ| {figures.max_abs:.3g} > {tol.max_abs:g}")
    if tol.max_kl is not None and not figures.kl <= tol.max_kl:
        failures.append(f"KL {figures.kl:.3g} > {tol.max_kl:g}")
    if tol.min_top1 is not None and not figures.top1_decisive >= tol.min_top1:
        failures.append(f"top-1 {figures.top1_decisive:.2%} < {tol.min_top1:.0%}")
    return failures


@dataclass(frozen=True)
class ArtifactParity:
    """One artifact run in its runtime and judged against the reference: what the parity stage hands the runner
    (which fails the run on ``passed`` False) and what report.json holds under the artifact (``to_report``)."""

    format: str
    path: str
    runtime: str  # transformers, llama.cpp, onnxruntime
    dtype: str  # the variant written (safetensors dtype, GGUF type, ONNX precision)
    probes: Literal["text", "random ids"]  # which probes the declared tolerance judged
    figures: ParityFigures  # on the judged probes
    tolerance: Tolerance  # the declared one, after any --max-abs/--max-kl/--min-top1 override
    random_ids: ParityFigures | None  # the random-id probes, judged apart when text probes exist
    random_tolerance: Tolerance | None  # … by this looser bound
    checks_key: str  # the name its runtime's own checks go under in the report ("tokenizer", "kv_cache")
    checks: dict[str, Any] | None  # what those checks measured
    adapter_effect_kept: float | None  # share of the adapter's effect on the probes the artifact keeps
    adapter_kl: float  # KL of the base without the adapter to the reference: how far the adapter moves the model
    vs_training_reference: ParityFigures | None  # against base dequantized + adapter, when merged into the original
    failures: tuple[str, ...]  # the failed criteria, as short phrases
    # several adapters combined: each input adapter (as the user named it) -> the share of its own effect (the
    # adapter alone on the base, as trained) that the artifact keeps; None where the adapter moves nothing
    effect_kept_per_adapter: dict[str, float | None] | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_report(self) -> dict[str, Any]:
        """The report.json form (a flat dict: the figures beside what judged them)."""
        tol = self.tolerance
        return {
            "format": self.format, "path": self.path, "runtime": self.runtime, "dtype": self.dtype,
            "probes": self.probes, **dataclasses.asdict(self.figures),
            "thresholds": {"max_abs": tol.max_abs, "max_kl": tol.max_kl, "min_top1": tol.min_top1,
                           "broken_kl": tol.broken_kl},
            "threshold_reason": tol.reason,
            "random_probes": None if self.random_ids is None or self.random_tolerance is None else {
                **dataclasses.asdict(self.random_ids),
                "thresholds": {"max_abs": self.random_tolerance.max_abs, "max_kl": self.random_tolerance.max_kl}},
            self.checks_key: self.checks,
            "adapter_effect_kept": self.adapter_effect_kept, "adapter_kl": self.adapter_kl,
            "effect_kept_per_adapter": self.effect_kept_per_adapter,
            "vs_training_reference": None if self.vs_training_reference is None else dataclasses.asdict(
                self.vs_training_reference),
            "passed": self.passed, "failures": "; ".join(self.failures),
        }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of parity results, one row per artifact, from their report form (ArtifactParity.to_report:
    the model card draws it from report.json)."""
    per_adapter = any(r.get("effect_kept_per_adapter") for r in rows)  # several adapters combined: one more column
    header = ("artifact", "runtime", "dtype", "positions", "max|Δlogit|", "KL(ref‖out)", "top-1", "top-1 decisive",
              *(("each adapter's effect kept",) if per_adapter else ()), "result")
    lines = [header]
    for r in rows:
        kept = ", ".join(f"{name} {'-' if share is None else f'{share:.0%}'}"
                         for name, share in (r.get("effect_kept_per_adapter") or {}).items())
        lines.append((
            r["format"], r["runtime"], r["dtype"], str(r["positions"]), f"{r['max_abs']:.3g}", f"{r['kl']:.3g}",
            f"{r['top1']:.2%}", f"{r['top1_decisive']:.2%} of {r['decisive_positions']}",
            *((kept,) if per_adapter else ()), "PASS" if r["passed"] else "FAIL: " + r["failures"],
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
