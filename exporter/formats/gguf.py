"""gguf[:TYPE]: the merged model as one GGUF file for llama.cpp and Ollama (model-TYPE.gguf), with an Ollama
Modelfile beside it. Every type is rounded or quantized once, from the merge's float32 rows (F32 carries the fp32
merge itself, whatever the base's dtype). K-quants (q4_k_m, q5_k_m, q6_k) are written F32 first and quantized by
llama.cpp's own quantizer. Parity runs the file in llama.cpp and checks that llama.cpp tokenizes as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.context import Artifact, Context, FormatRequest
from exporter.errors import ExportError, InputError
from exporter.formats.base import ArtifactRuntime, Format
from exporter.model_files import provenance, special_tokens
from exporter.parity.probes import probe_texts
from exporter.parity.runtimes import llama_cpp_logits, route_llama_cpp_logs
from exporter.parity.tolerances import Tolerance

DEFAULT_TYPE = "f16"
# ggml computes GELU through an fp16 lookup table, so llama.cpp's f32 logits for GELU models sit ~2e-3 from the exact
# function (measured: llama.cpp matches an HF Gemma 2 whose GELU is rounded through fp16 to 2.5e-6).
GELU_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
GELU_F32 = Tolerance(
    None, 1e-4, 0.99,
    "ggml computes GELU through an fp16 lookup table (measured ~2e-3 from the exact function on Gemma 2/3); judged by "
    "KL (measured ~1e-8) and top-1 instead of max |Δ|.")


def gguf_vocab(ctx: Context) -> Any:
    """The merged model's tokenizer as a GGUF vocabulary (the pre-flight loads it once for every GGUF type)."""
    from converters.gguf.vocab import VocabError, load_vocab

    if ctx.tokenizer_dir is None:
        raise InputError(str(ctx.base.path), "holds no tokenizer, and neither does the adapter folder; a GGUF carries "
                         "its tokenizer inside it.", "put the model's tokenizer files (tokenizer.json or "
                         "tokenizer.model, tokenizer_config.json) beside the base or the adapter.")
    try:
        return load_vocab(ctx.model_files, ctx.plan.gguf_pre, ctx.tokenizer_json)
    except VocabError as e:
        raise InputError(str(ctx.tokenizer_dir), f"its tokenizer cannot be written into a GGUF: {e}.",
                         "do as the message says, or export safetensors instead (--to safetensors).") from e


@dataclass
class GGUFPrepared:
    """What the pre-flight prepared for one GGUF type: the tensor plan and the vocabulary (shared by every type)."""

    plan: Any  # converters.gguf.writer.GGUFPlan
    vocab: Any  # converters.gguf.vocab.Vocab


def _file_name(variant: str) -> str:
    return f"model-{variant.upper()}.gguf"


class GGUFSink:
    consumes_stream = True

    def __init__(self, ctx: Context, variant: str, prepared: GGUFPrepared) -> None:
        from converters.gguf.writer import GGUFStreamWriter

        self.ctx, self.variant = ctx, variant
        self.staged = ctx.staging / _file_name(variant)
        self.writer = GGUFStreamWriter(self.staged, prepared.plan, prepared.vocab, metadata=provenance(ctx),
                                       name=str(ctx.base.config.get("_name_or_path") or ctx.base.path.name),
                                       check_range=ctx.plan.check_finite)
        self.row_unit = self.writer.row_unit
        self.encoder = self.writer.encoder

    def close(self) -> list[Artifact]:
        result = self.writer.close()
        for note in result.notes:
            if note not in self.ctx.notes:
                self.ctx.note(note)
        self._write_modelfile()
        return [Artifact("gguf", self.ctx.plan.out / self.staged.name, self.staged, variant=self.variant)]

    def abort(self) -> None:
        self.writer.abort()

    def _write_modelfile(self) -> None:
        from converters.gguf.modelfile import modelfile

        special, template = special_tokens(self.ctx.model_files)
        text, notes = modelfile(self.staged.name, template, special, [special.get("eos_token", "")])
        for note in notes:
            if note not in self.ctx.notes:
                self.ctx.note(note)
        several = sum(1 for r in self.ctx.formats if r.name == "gguf") > 1
        (self.ctx.staging / (f"Modelfile.{self.variant}" if several else "Modelfile")).write_text(text)


class GGUFFormat(Format):
    name = "gguf"
    runtime = "llama.cpp"
    checks_key = "tokenizer"
    default_variant = DEFAULT_TYPE
    tolerances = {
        "f32": Tolerance(
            1e-3, None, None,
            "llama.cpp in f32 (f32 KV cache, flash attention off) differs from transformers by kernel summation "
            "order (~1e-5 measured on tiny models); 1e-3 still catches a missing rope permutation or norm shift by far."),
        "f16": Tolerance(None, 1e-2, 0.99, "fp16 weights and llama.cpp's fp16 matmul paths; the distribution must hold."),
        "bf16": Tolerance(None, 1e-2, 0.99, "bf16 weights (8 mantissa bits); the distribution must hold."),
        "q8_0": Tolerance(
            None, 5e-2, 0.95, "8-bit blocks: KL ≈ 2-7e-3 measured on Gemma 3 270M; top-1 may flip on close calls."),
        **{name: Tolerance(None, 1.0, None,
                           "lossy by design: figures are reported; only a KL above 1 nat (a broken file) fails.")
           for name in ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")},
    }
    arch_tolerances = {("f32", arch): GELU_F32 for arch in GELU_ARCHITECTURES}

    def variants(self) -> tuple[str, ...]:
        from converters.gguf.types import GGUF_TYPES  # imported only when asked for: gguf costs ~0.15 s

        return tuple(GGUF_TYPES)

    def preflight(self, ctx: Context, variants: list[str | None]) -> list[GGUFPrepared]:
        """Architecture, every tensor's place in llama.cpp's graph, the tokenizer (loaded once for every type),
        llama.cpp for K-quants."""
        from converters.gguf.vocab import VocabError

        plans = [self._plan(ctx, variant) for variant in variants]  # the architecture first: it refuses most
        vocab = gguf_vocab(ctx)
        for plan in plans:
            try:
                vocab.pad_to(plan.embed_rows)
            except VocabError as e:
                raise InputError(str(ctx.tokenizer_dir), f"{e}.", "use the tokenizer the model was trained with.") from e
        return [GGUFPrepared(plan, vocab) for plan in plans]

    @staticmethod
    def _plan(ctx: Context, variant: str) -> Any:
        from converters.gguf.arch import ArchError
        from converters.gguf.types import GGUF_TYPES
        from converters.gguf.writer import GGUFExportError, GGUFPlan, require_llama_cpp

        config_path = ctx.base.path / "config.json"
        try:
            plan = GGUFPlan(ctx.merged_config, [(t.name, t.shape) for t in ctx.layout.tensors], variant)
        except (ArchError, GGUFExportError) as e:
            raise InputError(str(config_path), f"{e}.", "export safetensors instead.") from e
        if GGUF_TYPES[variant].weight_type is None:
            try:
                require_llama_cpp(variant)
            except GGUFExportError as e:
                raise ExportError(f"--to gguf:{variant}", f"{e}.") from e
        return plan

    def output_bytes(self, ctx: Context, request: FormatRequest) -> tuple[int, int]:
        """The planned file: each tensor's data on the 32-byte alignment, its tensor info, the vocabulary and the other
        metadata. K-quants: the quantized file at an upper bound of llama.cpp's mix, plus the F32 file it is made
        from, which sits beside it meanwhile."""
        from gguf import GGUFWriter

        from converters.gguf.types import k_quant_bytes_bound

        plan, vocab = request.prepared.plan, request.prepared.vocab
        header = sum(len(t.gguf_name) + 64 for t in plan.order) + vocab.metadata_bytes() + 64 * 1024
        written = sum(GGUFWriter.ggml_pad(t.nbytes, 32) for t in plan.order) + header
        if plan.gguf_type is plan.written_type:
            return written, 0
        quantized = sum(GGUFWriter.ggml_pad(k_quant_bytes_bound(t.gguf_name, t.shape, plan.type_name), 32)
                        for t in plan.order)
        return quantized + header, written

    def open_sink(self, ctx: Context, request: FormatRequest) -> GGUFSink:
        return GGUFSink(ctx, request.variant, request.prepared)

    def open_runtime(self, artifact: Artifact, ctx: Context) -> ArtifactRuntime:
        return GGUFRuntime(artifact.staged)


class GGUFRuntime(ArtifactRuntime):
    """A GGUF in llama.cpp: logits with an f32 KV cache, and its tokenizer against transformers'."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def logits(self, probes: list[torch.Tensor]) -> torch.Tensor:
        return llama_cpp_logits(self.path, probes)

    def checks(self, tokenizer: Any) -> tuple[dict | None, list[str]]:
        """llama.cpp's tokenization of the GGUF against transformers', on the probe texts and a chat turn."""
        if tokenizer is None:
            return None, []
        from llama_cpp import Llama

        texts = probe_texts(tokenizer)
        route_llama_cpp_logs()
        llm = Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        try:
            mismatched = [text[:40] for text in texts
                          if llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
                          != tokenizer(text, add_special_tokens=True)["input_ids"]]
        finally:
            llm.close()
        failures = [f"tokenizer differs on {len(mismatched)} of {len(texts)} texts"] if mismatched else []
        return {"texts": len(texts), "mismatched": mismatched}, failures


FORMAT = GGUFFormat()
