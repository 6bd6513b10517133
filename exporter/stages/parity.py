"""parity: run each artifact in the runtime its users run and compare it with the unmerged model, base + adapter.

Probes (exporter/probes.py) are short texts through the output's tokenizer, a rendered chat turn, random token ids and
any rows a resized vocabulary added. Text probes are judged by the format's declared tolerance, random ids (out of
distribution, where rounding is amplified) by a looser one: see tolerances.py. The reference (float32, hooks) is
computed once and shared by every artifact; each format says how its artifact runs and what else it checks.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from exporter.context import Context
from exporter.errors import StageCheckError
from exporter.formats import FORMATS
from exporter.probes import Probes, probe_inputs
from exporter.reference import load_reference
from exporter.report import compare_logits, format_table, judge
from exporter.runners import run_logits
from exporter.tolerances import RANDOM_PROBE_FACTOR, Tolerance

log = logging.getLogger("lora_export")


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _tolerance(ctx: Context, fmt: str, variant: str) -> Tolerance:
    """The declared tolerance; explicit overrides from the plan win."""
    tol = FORMATS.get(fmt).tolerance(variant, next(iter(ctx.base.config.get("architectures") or []), None))
    plan = ctx.plan
    overrides = {k: v for k, v in (("max_abs", plan.max_abs), ("max_kl", plan.max_kl), ("min_top1", plan.min_top1))
                 if v is not None}
    return dataclasses.replace(tol, **overrides) if overrides else tol


def _out_of_distribution(tol: Tolerance) -> Tolerance:
    return dataclasses.replace(
        tol, max_abs=None if tol.max_abs is None else tol.max_abs * RANDOM_PROBE_FACTOR,
        max_kl=None if tol.max_kl is None else tol.max_kl * RANDOM_PROBE_FACTOR, min_top1=None)


def _positions(probes: Probes, text: bool) -> torch.Tensor:
    """Row mask over the concatenated logits selecting text (or random) probe positions."""
    return torch.cat([torch.full((len(p),), kind == text) for p, kind in zip(probes.inputs, probes.is_text)])


class ParityStage:
    name = "parity"

    def run(self, ctx: Context) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' per-load bars would interleave with ours
        # Loaded once for every artifact (Gemma's 262k-token tokenizer takes about a second each time).
        tok = _tokenizer(ctx.model_files) if (ctx.model_files / "tokenizer_config.json").is_file() else None
        reference = load_reference(ctx.base.path, ctx.adapter.path, ctx.device, ctx.plan.allow_pickle)
        vocab = reference.get_input_embeddings().weight.shape[0]
        probes = probe_inputs(tok, vocab, ctx.layout.base_vocab or vocab)
        ref_logits = run_logits(reference, probes.inputs, ctx.device)
        del reference
        text_rows = _positions(probes, text=True)
        for artifact in ctx.artifacts:
            fmt = FORMATS.get(artifact.format)
            out_logits = fmt.run_parity(artifact, ctx, probes.inputs)
            tol = _tolerance(ctx, artifact.format, artifact.variant)
            if text_rows.any():
                # In-distribution text is judged by the declared tolerance, random ids by the looser one.
                figures = compare_logits(ref_logits[text_rows], out_logits[text_rows])
                random_figures = compare_logits(ref_logits[~text_rows], out_logits[~text_rows])
                random_tol = _out_of_distribution(tol)
                failures = judge(figures, tol) + [f"random ids: {f}" for f in judge(random_figures, random_tol)]
                random_part = {**dataclasses.asdict(random_figures),
                               "thresholds": {"max_abs": random_tol.max_abs, "max_kl": random_tol.max_kl}}
            else:
                figures = compare_logits(ref_logits, out_logits)
                failures, random_part = judge(figures, tol), None
            extra, extra_failures = fmt.parity_checks(artifact, ctx, tok)
            failures += extra_failures
            artifact.parity = {
                "format": artifact.format, "path": str(artifact.path), "runtime": fmt.runtime,
                "dtype": artifact.variant, "probes": "text" if text_rows.any() else "random ids",
                **dataclasses.asdict(figures),
                "thresholds": {"max_abs": tol.max_abs, "max_kl": tol.max_kl, "min_top1": tol.min_top1},
                "threshold_reason": tol.reason, "random_probes": random_part, "tokenizer": extra,
                "passed": not failures, "failures": "; ".join(failures),
            }
        rows = [a.parity for a in ctx.artifacts if a.parity]
        ctx.report["parity_table"] = format_table(rows)
        log.debug("parity:\n%s", ctx.report["parity_table"])

    def check(self, ctx: Context) -> None:
        # A failed comparison is reported by the runner (after report.json is written), not raised here, so the
        # figures survive. Here: every artifact must have been compared.
        missing = [a.format for a in ctx.artifacts if a.parity is None]
        if missing:
            raise StageCheckError("parity", f"no figures for {missing}.", "report this as a bug.")
