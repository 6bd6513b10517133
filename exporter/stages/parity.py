"""parity: run each artifact in the runtime its users run and compare it with the unmerged model, base + adapter.

Probes are short texts through the output's tokenizer (plus a rendered chat turn when there is a chat template),
random token ids over the whole vocabulary, and the rows added to a resized vocabulary. Text probes are judged by the
declared tolerance, random ids (out of distribution, where rounding is amplified) by a looser one: see tolerances.py.
The reference (float32, hooks) is computed once and shared by every artifact. GGUF files also have their tokenizer
checked: llama.cpp must tokenize the probe texts exactly as transformers does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.errors import StageCheckError
from exporter.pipeline import Artifact, Context
from exporter.reference import load_reference
from exporter.stages.export import TOKENIZER_FILES, copy_tokenizer
from exporter.report import compare_logits, format_table, judge
from exporter.tolerances import RANDOM_PROBE_FACTOR, Tolerance, tolerance_for

log = logging.getLogger("lora_export")

PROBE_TEXTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a quiet village by the sea,",
    "Translate to German: Good morning, how are you?",
)
RANDOM_SEQUENCES, RANDOM_LENGTH, PROBE_SEED = 2, 24, 0


@dataclass(frozen=True)
class Probes:
    inputs: list[torch.Tensor]
    is_text: list[bool]  # tokenized text (in distribution) or random ids (out of distribution)


def probe_texts(tok: Any) -> list[str]:
    """The fixed texts, plus one chat turn rendered by the model's own template when it has one."""
    texts = list(PROBE_TEXTS)
    if getattr(tok, "chat_template", None):
        texts.append(tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                             add_generation_prompt=True))
    return texts


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def probe_inputs(tok: Any | None, vocab_size: int, base_vocab: int) -> Probes:
    """Probe ids: the texts through ``tok`` (a transformers tokenizer, or None), then random ids."""
    inputs: list[torch.Tensor] = []
    if tok is not None:
        # add_special_tokens=False for the rendered chat turn: the template already wrote its own BOS.
        inputs += [torch.tensor(tok(text, add_special_tokens=i < len(PROBE_TEXTS))["input_ids"])
                   for i, text in enumerate(probe_texts(tok))]
    n_text = len(inputs)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    for _ in range(RANDOM_SEQUENCES):
        inputs.append(torch.randint(0, vocab_size, (RANDOM_LENGTH,), generator=gen))
    if vocab_size > base_vocab:  # the rows a resized vocabulary added must be checked too
        added = torch.arange(base_vocab, vocab_size)
        inputs.append(added[torch.randint(0, len(added), (RANDOM_LENGTH,), generator=gen)])
    kinds = [i < n_text for i in range(len(inputs))]
    keep = [i for i, p in enumerate(inputs) if p.numel() > 0]
    return Probes([inputs[i] for i in keep], [kinds[i] for i in keep])


@torch.no_grad()
def run_logits(model: torch.nn.Module, probes: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(total positions, vocab) float32 logits, one probe at a time (no padding to get wrong)."""
    rows = [model(input_ids=p.unsqueeze(0).to(device)).logits[0].to(torch.float32).cpu() for p in probes]
    return torch.cat(rows)


def run_transformers(artifact: Artifact, ctx: Context, probes: list[torch.Tensor]) -> torch.Tensor:
    """The folder as transformers loads it, weights exactly as stored, computed in float32.

    float32 compute makes the figures measure the artifact (the merge and the rounding of its weights), not bf16
    arithmetic: running Gemma 3 270M's *unmodified* base in bf16 already gives KL ≈ 1e-2 against fp32 on random-token
    probes, the same for any bf16 model, PEFT's own merge included.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(artifact.staged, dtype=torch.float32, trust_remote_code=False)
    model.eval().to(ctx.device)
    logits = run_logits(model, probes, ctx.device)
    del model
    return logits


def _llama(model_path: Path, n_ctx: int, lora_path: Path | None = None) -> Any:
    from llama_cpp import Llama

    # f32 KV cache and no flash attention: llama.cpp's defaults (f16 cache) add ~5e-3 of logit error on their own.
    return Llama(model_path=str(model_path), n_ctx=n_ctx, logits_all=True, flash_attn=False, type_k=0, type_v=0,
                 n_gpu_layers=-1 if torch.cuda.is_available() else 0, n_threads=os.cpu_count() or 1,
                 lora_path=str(lora_path) if lora_path else None, verbose=False, swa_full=True)


def _llama_logits(llm: Any, probes: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for probe in probes:
        llm.reset()
        llm.eval(probe.tolist())
        rows.append(torch.from_numpy(np.array(llm.scores[: len(probe)], dtype=np.float32)))
    return torch.cat(rows)


def run_llama_cpp(artifact: Artifact, ctx: Context, probes: list[torch.Tensor]) -> torch.Tensor:
    llm = _llama(artifact.staged, max(len(p) for p in probes) + 8)
    try:
        return _llama_logits(llm, probes)
    finally:
        llm.close()


def run_llama_cpp_lora(artifact: Artifact, ctx: Context, probes: list[torch.Tensor]) -> torch.Tensor:
    """The base as an f32 GGUF (temporary, in staging) with the adapter applied by llama.cpp at run time."""
    from converters.gguf.writer import write_gguf

    base_gguf = ctx.staging / ".base-for-lora-parity.gguf"
    with tempfile.TemporaryDirectory(dir=ctx.staging) as tmp:
        # The base folder may lack the tokenizer (it came with the adapter): assemble a view with both.
        view = Path(tmp)
        for item in ctx.base.path.iterdir():
            if item.suffix in (".safetensors", ".json") and item.name not in TOKENIZER_FILES:
                (view / item.name).symlink_to(item.resolve())
        copy_tokenizer(ctx.tokenizer_dir, view)
        write_gguf(view, base_gguf, "f32", pre_tokenizer=ctx.plan.gguf_pre)
    try:
        llm = _llama(base_gguf, max(len(p) for p in probes) + 8, lora_path=artifact.staged)
        try:
            return _llama_logits(llm, probes)
        finally:
            llm.close()
    finally:
        base_gguf.unlink(missing_ok=True)


def gguf_tokenizer_agreement(artifact: Artifact, tok: Any | None) -> dict[str, Any] | None:
    """llama.cpp's tokenization of the GGUF against the HF tokenizer's, on the probe texts and a chat turn."""
    if tok is None:
        return None
    from llama_cpp import Llama

    texts = probe_texts(tok)
    llm = Llama(model_path=str(artifact.staged), vocab_only=True, verbose=False)
    try:
        mismatched = [text[:40] for text in texts
                      if llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
                      != tok(text, add_special_tokens=True)["input_ids"]]
    finally:
        llm.close()
    return {"texts": len(texts), "mismatched": mismatched}


# artifact format -> (runtime name, runner)
RUNNERS: dict[str, tuple[str, Callable[[Artifact, Context, list[torch.Tensor]], torch.Tensor]]] = {
    "safetensors": ("transformers", run_transformers),
    "gguf": ("llama.cpp", run_llama_cpp),
    "gguf-lora": ("llama.cpp+lora", run_llama_cpp_lora),
}


def _tolerance(ctx: Context, fmt: str, dtype: str) -> Tolerance:
    """The declared tolerance; explicit overrides from the plan win."""
    tol = tolerance_for(fmt, dtype, next(iter(ctx.base.config.get("architectures") or []), None))
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
        tok = _tokenizer(ctx.hf_dir) if (ctx.hf_dir / "tokenizer_config.json").is_file() else None
        reference = load_reference(ctx.base.path, ctx.adapter, ctx.device)
        vocab = reference.get_input_embeddings().weight.shape[0]
        probes = probe_inputs(tok, vocab, ctx.layout.base_vocab or vocab)
        ref_logits = run_logits(reference, probes.inputs, ctx.device)
        del reference
        text_rows = _positions(probes, text=True)
        for artifact in ctx.artifacts:
            if artifact.format not in RUNNERS:
                log.warning("no parity runner for %s artifacts", artifact.format)
                continue
            runtime, runner = RUNNERS[artifact.format]
            out_logits = runner(artifact, ctx, probes.inputs)
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
            tokenizer = gguf_tokenizer_agreement(artifact, tok) if artifact.format == "gguf" else None
            if tokenizer and tokenizer["mismatched"]:
                failures.append(f"tokenizer differs on {len(tokenizer['mismatched'])} of {tokenizer['texts']} texts")
            artifact.parity = {
                "format": artifact.format, "path": str(artifact.path), "runtime": runtime, "dtype": artifact.variant,
                "probes": "text" if text_rows.any() else "random ids", **dataclasses.asdict(figures),
                "thresholds": {"max_abs": tol.max_abs, "max_kl": tol.max_kl, "min_top1": tol.min_top1},
                "threshold_reason": tol.reason, "random_probes": random_part, "tokenizer": tokenizer,
                "passed": not failures, "failures": "; ".join(failures),
            }
        rows = [a.parity for a in ctx.artifacts if a.parity]
        ctx.report["parity_table"] = format_table(rows)
        log.debug("parity:\n%s", ctx.report["parity_table"])

    def check(self, ctx: Context) -> None:
        # A failed comparison is reported by the runner (after report.json is written), not raised here, so the
        # figures survive. Here: every artifact that has a runner must have been compared.
        missing = [a.format for a in ctx.artifacts if a.format in RUNNERS and a.parity is None]
        if missing:
            raise StageCheckError("parity", f"no figures for {missing}.", "report this as a bug.")
