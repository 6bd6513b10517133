"""parity: run each artifact in the runtime its users run and compare it with the unmerged model, base + adapter.

Probes (exporter/parity/probes.py) are short texts through the output's tokenizer, a rendered chat turn, random token ids and
any rows a resized vocabulary added. Text probes are judged by the format's declared tolerance, random ids (out of
distribution, where rounding is amplified) by a looser one: see tolerances.py. The reference (float32, hooks) is
computed once and shared by every artifact; each format says how its artifact runs and what else it checks.

transformers models (the reference, safetensors artifacts) run whole when they fit in memory, else module by module
(exporter/parity/layerwise.py): same logits either way, memory flat in model size. --parity-memory chooses; the report says
which ran and the peak resident memory it took.
"""

from __future__ import annotations

import dataclasses
from contextlib import closing
from dataclasses import dataclass
import logging
from pathlib import Path
from typing import Any

import psutil
import torch

from exporter.context import Artifact, Context, ParityOutcome
from exporter.errors import ExportError, StageCheckError
from exporter.formats import FORMATS
from exporter.parity.figures import ArtifactParity, compare_logits, format_table, judge
from exporter.parity.layerwise import LayerwiseError, count_weighted_modules, probe_logits, \
    return_freed_memory_to_the_os, skeleton
from exporter.parity.probes import Probes, probe_inputs
from exporter.parity.reference import BaseModelTensors, load_reference
from exporter.parity.tolerances import RANDOM_PROBE_FACTOR, Tolerance
from exporter.progress import PeakRss, progress

# Whole-model runs hold the reference (float32) and its activations: pick them only with this much room to spare.
WHOLE_MODEL_HEADROOM, WHOLE_MODEL_SPARE_BYTES = 1.5, 2**30

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


def _applied(ctx: Context) -> str:
    """The adapter part of the reference, in words."""
    if ctx.combination is None:
        return "the adapter"
    if ctx.combination["method"] in ("sum", "cat"):
        method, count = ctx.combination["method"], len(ctx.combination["adapters"])
        return f"every adapter ({method} of {count}, each with its weight)"
    if ctx.combination["space"] == "delta":
        return (f"the adapters' deltas combined by {ctx.combination['method']} (mergekit's definition, computed per "
                "module as the merge computes them: this checks the formats, tests check the combination)")
    return f"the combined adapter ({ctx.combination['method']}, PEFT's definition)"


def choose_parity_mode(ctx: Context) -> tuple[str, str]:
    """whole or streamed, and why: "auto" runs whole-model when the model in float32 fits comfortably in the memory
    available now (faster), module by module otherwise."""
    asked = ctx.plan.parity_memory
    fp32_bytes = sum(t.spec().nbytes // t.dtype.itemsize * 4 for t in ctx.layout.tensors if t.dtype.is_floating_point)
    available = psutil.virtual_memory().available
    sizes = f"the model is {fp32_bytes / 1e9:.2f} GB in float32, {available / 1e9:.1f} GB of memory is available"
    if asked != "auto":
        return asked, f"--parity-memory {asked} ({sizes})"
    if fp32_bytes * WHOLE_MODEL_HEADROOM + WHOLE_MODEL_SPARE_BYTES <= available:
        return "whole", f"auto: {sizes}"
    return "streamed", f"auto: {sizes}, so module by module"


def _base_rows(probes: Probes, ctx: Context) -> torch.Tensor:
    """Row mask of the positions the base alone can run: probes of rows a resized vocabulary added are left out."""
    base_vocab = ctx.layout.base_vocab
    return torch.cat([torch.full((len(p),), base_vocab is None or int(p.max()) < base_vocab) for p in probes.inputs])


def _labels(adapters: tuple[str, ...]) -> list[str]:
    """Short names for the input adapters, for the table: a folder's own name, a Hub id as given; the whole of what
    the user typed where two would read the same."""
    short = [Path(a).name if Path(a).is_dir() else a for a in adapters]
    return [s if short.count(s) == 1 else a for s, a in zip(short, adapters)]


def _effect_kept(artifact_kl: float, adapter_kl: float) -> float | None:
    """1 − KL(reference‖artifact) / KL(reference‖base): the share of the adapter's effect on the probes that the
    artifact keeps (1: all of it; 0: it behaves like the base; negative: further from the reference than the base)."""
    return None if adapter_kl <= 0 else 1.0 - artifact_kl / adapter_kl


def _out_of_distribution(tol: Tolerance) -> Tolerance:
    return dataclasses.replace(
        tol, max_abs=None if tol.max_abs is None else tol.max_abs * RANDOM_PROBE_FACTOR,
        max_kl=None if tol.max_kl is None else tol.max_kl * RANDOM_PROBE_FACTOR, min_top1=None)


def _positions(probes: Probes, text: bool) -> torch.Tensor:
    """Row mask over the concatenated logits selecting text (or random) probe positions."""
    return torch.cat([torch.full((len(p),), kind == text) for p, kind in zip(probes.inputs, probes.is_text)])


@dataclass(frozen=True)
class _References:
    """What every artifact is judged against (see ParityStage._references)."""

    probes: Probes
    ref_logits: torch.Tensor  # base + adapter on the fly, float32 (the original base's under --merge-into original)
    training_logits: torch.Tensor | None  # the dequantized base + adapter, when the merge went into other weights
    text_rows: torch.Tensor  # row masks over the concatenated probe positions
    judged_rows: torch.Tensor
    effect_rows: torch.Tensor
    effect_ref: torch.Tensor  # the reference on effect_rows, the base's vocabulary wide
    width: int  # the base's vocabulary
    adapter_kl: float  # KL(reference‖base): how far the adapter moves the model
    described: str  # the reference, in words for the report
    # several adapters combined: (name, that adapter alone on effect_rows, KL(it‖base)) for each input adapter
    each_adapter: tuple[tuple[str, torch.Tensor, float], ...] = ()
    alone: str | None = None  # the adapter kept apart whose file these judge (None: the run's reference)


class ParityStage:
    name = "parity"

    def run(self, ctx: Context) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' per-load bars would interleave with ours
        ctx.parity_mode, why = choose_parity_mode(ctx)
        if ctx.parity_mode == "streamed":
            return_freed_memory_to_the_os()
        log.info("parity runs models %s: %s", "whole" if ctx.parity_mode == "whole" else "module by module", why)
        with PeakRss() as peak:
            described, table = self._run(ctx)
        ctx.parity = ParityOutcome(described, {"mode": ctx.parity_mode, "why": why,
                                               "peak_rss_mb": round(peak.peak / 2**20),
                                               "peak_anon_mb": round(peak.peak_anon / 2**20)}, table)

    @staticmethod
    def _model_logits(ctx: Context, tok: Any, with_adapter: bool, probes: Probes | None = None,
                      base: Any = None, alone: Path | None = None) -> tuple[Probes, torch.Tensor]:
        """The reference (base + adapter on the fly), or the base alone (``base``: another base than the run's, the
        original of a quantized one), or (``alone``) the base + that one input adapter of a combination; probes are
        made on the first call."""
        base = base or ctx.base
        applied = [(alone, 1.0)] if alone is not None else ctx.reference_adapters if with_adapter else None
        quantized = base.quantization is not None
        try:
            model = skeleton(base.path)  # parameters on meta: costs no memory
            desc = f"parity: {alone.name} alone" if alone else "parity reference" if with_adapter else "parity base"
            with progress(ctx, desc, count_weighted_modules(model)) as bar:
                model = load_reference(base.path, applied, ctx.device,
                                       ctx.plan.allow_pickle, mode=ctx.parity_mode,
                                       base_tensors=BaseModelTensors(base) if quantized else None,
                                       on_module=bar.update, model=model,
                                       deltas=ctx.combined_deltas if with_adapter and alone is None else None)
                if probes is None:
                    vocab = model.get_input_embeddings().weight.shape[0]
                    probes = probe_inputs(tok, vocab, ctx.layout.base_vocab or vocab)
                base_vocab = ctx.layout.base_vocab
                inputs = probes.inputs if with_adapter else \
                    [p for p in probes.inputs if base_vocab is None or int(p.max()) < base_vocab]
                if not inputs:  # every probe holds added tokens (no tokenizer, so no text probes): nothing to run
                    return probes, torch.empty(0, base_vocab or model.get_input_embeddings().weight.shape[0])
                return probes, probe_logits(model, inputs, ctx.device)
        except LayerwiseError as e:
            raise ExportError(str(ctx.base.path), f"parity cannot load this model {ctx.parity_mode} ({e}).",
                              "pass --parity-memory whole, or --parity off.") from e

    def _run(self, ctx: Context) -> tuple[str, str]:
        """Every artifact compared with the reference; returns the reference in words and the human table."""
        # Loaded once for every artifact (Gemma's 262k-token tokenizer takes about a second each time).
        tok = _tokenizer(ctx.model_files) if (ctx.model_files / "tokenizer_config.json").is_file() else None
        # One reference for every artifact; with adapters kept apart (one file each), each file's own adapter's,
        # computed when its first artifact comes (they come grouped) and dropped after.
        refs, described = None, []
        for artifact in ctx.artifacts:
            alone = artifact.details.get("adapter")
            if refs is None or refs.alone != alone:
                refs = self._references(ctx, tok, alone)
                described.append(refs.described)
            artifact.parity = self._judge(ctx, artifact, refs, tok)
            FORMATS.get(artifact.format).after_parity(artifact, ctx)
        table = format_table([a.parity.to_report() for a in ctx.artifacts if a.parity])
        log.debug("parity:\n%s", table)
        return "; ".join(described), table

    def _references(self, ctx: Context, tok: Any, alone: str | None = None) -> _References:
        """The logits every artifact is judged against: the reference (base + adapter, float32), training's
        reference when the merge went into other weights, and the base alone (how far the adapter moves the model).
        ``alone``: the folder of one adapter kept apart, the reference of its own file."""
        probes, ref_logits = self._model_logits(ctx, tok, with_adapter=True,
                                                alone=Path(alone) if alone is not None else None)
        applied = f"the adapter {Path(alone).name}" if alone is not None else _applied(ctx)
        described = ("the base" + (f" dequantized from {ctx.dequantized['type']} (what QLoRA training computed with)"
                                   if ctx.base.quantization is not None else "")
                     + f" + {applied} applied on the fly, float32")
        training_logits = None
        if ctx.merge_base is not None:
            # Merged into the original full-precision weights: judged against original + adapter, and the distance
            # to what training saw (the dequantized base + adapter) reported beside it.
            training_logits = ref_logits
            _, ref_logits = self._model_logits(ctx, tok, with_adapter=True, probes=probes, base=ctx.merge_base)
            described = ("the original base + the adapter applied on the fly, float32 (the figures against "
                         "training's reference are under vs_training_reference)")
        text_rows = _positions(probes, text=True)
        _, base_logits = self._model_logits(ctx, tok, with_adapter=False, probes=probes)
        judged_rows = text_rows if text_rows.any() else torch.ones_like(text_rows)
        base_rows = _base_rows(probes, ctx)
        width = base_logits.shape[-1]  # a resized vocabulary: the base has no logits for the added tokens
        training_ref = ref_logits if training_logits is None else training_logits
        # Effect kept compares the artifact and the base on the same rows and vocabulary width: text rows the base
        # can read (no added tokens), its own logits only.
        effect_rows = judged_rows & base_rows
        effect_ref = training_ref[effect_rows][:, :width]
        base_on_effect_rows = base_logits[judged_rows[base_rows]]
        adapter_kl = compare_logits(effect_ref, base_on_effect_rows).kl if effect_rows.any() else 0.0
        each_adapter = []
        if ctx.combination is not None and effect_rows.any():
            # Each input adapter alone on the base, as it was trained: how much of its own effect survives the
            # combination, so a user sees whether one adapter drowned the other.
            for name, folder in zip(_labels(ctx.plan.adapters), ctx.combination["adapters"]):
                _, alone = self._model_logits(ctx, tok, with_adapter=True, probes=probes, alone=Path(folder))
                alone_ref = alone[effect_rows][:, :width]
                each_adapter.append((name, alone_ref, compare_logits(alone_ref, base_on_effect_rows).kl))
        return _References(probes, ref_logits, training_logits, text_rows, judged_rows, effect_rows, effect_ref,
                           width, adapter_kl, described, tuple(each_adapter), alone)

    @staticmethod
    def _judge(ctx: Context, artifact: Artifact, refs: _References, tok: Any) -> ArtifactParity:
        """One artifact run in its runtime and judged."""
        fmt = FORMATS.get(artifact.format)
        with closing(fmt.open_runtime(artifact, ctx)) as runtime:
            out_logits = runtime.logits(refs.probes.inputs)
            extra, failures = runtime.checks(tok)
        tol = _tolerance(ctx, artifact.format, artifact.variant)
        text_rows, ref_logits = refs.text_rows, refs.ref_logits
        if text_rows.any():
            # In-distribution text is judged by the declared tolerance, random ids by the looser one.
            figures = compare_logits(ref_logits[text_rows], out_logits[text_rows])
            random_figures = compare_logits(ref_logits[~text_rows], out_logits[~text_rows])
            random_tol = _out_of_distribution(tol)
            failures = judge(figures, tol) + [f"random ids: {f}" for f in judge(random_figures, random_tol)] + failures
        else:
            figures = compare_logits(ref_logits, out_logits)
            failures, random_figures, random_tol = judge(figures, tol) + failures, None, None
        if tol.broken_kl is not None and figures.kl > refs.adapter_kl + tol.broken_kl:
            failures.append(f"KL {figures.kl:.3g} > the base's own {refs.adapter_kl:.3g} + {tol.broken_kl:g}")
        kept = _effect_kept(compare_logits(refs.effect_ref, out_logits[refs.effect_rows][:, :refs.width]).kl,
                            refs.adapter_kl) if refs.effect_rows.any() else None
        if kept is not None and kept < ctx.plan.min_effect_kept:
            message = (f"{artifact.format}:{artifact.variant} keeps {kept:.0%} of the adapter's effect on the "
                       f"probes (KL to the reference vs KL of the base without the adapter)")
            if ctx.plan.require_effect_kept:
                failures.append(f"keeps {kept:.0%} of the adapter's effect < {ctx.plan.min_effect_kept:.0%}")
            else:
                ctx.note(message + f"; below {ctx.plan.min_effect_kept:.0%}")
        out_effect = out_logits[refs.effect_rows][:, :refs.width] if refs.each_adapter else None
        kept_each = {name: _effect_kept(compare_logits(alone, out_effect).kl, kl)
                     for name, alone, kl in refs.each_adapter} or None
        low = [f"{name} {share:.0%}" for name, share in (kept_each or {}).items()
               if share is not None and share < ctx.plan.min_effect_kept]
        if low:
            ctx.note(f"{artifact.format}:{artifact.variant} keeps little of some adapters' own effect on the probes "
                     f"({', '.join(low)}; below {ctx.plan.min_effect_kept:.0%}): the combination may have drowned "
                     "them (check --weights and the method)")
        return ArtifactParity(
            format=artifact.format, path=str(artifact.path), runtime=fmt.runtime, dtype=artifact.variant,
            probes="text" if text_rows.any() else "random ids", figures=figures, tolerance=tol,
            random_ids=random_figures, random_tolerance=random_tol, checks_key=fmt.checks_key, checks=extra,
            adapter_effect_kept=kept, adapter_kl=refs.adapter_kl,
            vs_training_reference=None if refs.training_logits is None else compare_logits(
                refs.training_logits[refs.judged_rows], out_logits[refs.judged_rows]),
            failures=tuple(failures), effect_kept_per_adapter=kept_each)

    def check(self, ctx: Context) -> None:
        # A failed comparison is reported by the runner (after report.json is written), not raised here, so the
        # figures survive. Here: every artifact must have been compared.
        missing = [a.format for a in ctx.artifacts if a.parity is None]
        if missing:
            raise StageCheckError("parity", f"no figures for {missing}.", "report this as a bug.")
