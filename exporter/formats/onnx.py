"""onnx[:fp32|fp16][-nocache]: the merged causal LM as an ONNX folder that ONNX Runtime, onnxruntime-genai and
TensorRT take: model.onnx (graph only) + model.onnx.data (every weight, external data), config.json,
generation_config.json, the tokenizer and chat template, and genai_config.json. Inputs input_ids, attention_mask,
position_ids and, with the KV cache (default), past_key_values.N.key/value; outputs logits and present.N.key/value.

The graph is traced from config.json before the merge, without real weights (converters/onnx), so an architecture it
cannot handle is refused before anything runs; the merged weights then come from the one pass straight into the data
file, each cast once from float32. Parity runs the folder in ONNX Runtime (CUDA when present, else the CPU provider)
and, with the KV cache, checks that a prefill plus 8 decode steps gives the full recompute's logits.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.tensor_stream import StreamTensor
from exporter.context import Artifact, Context, FormatRequest
from exporter.errors import InputError
from exporter.formats.base import ArtifactRuntime, Format, GatheredCast
from exporter.model_files import copy_model_files, provenance
from exporter.parity.tolerances import Tolerance

VARIANTS = ("fp32", "fp16", "fp32-nocache", "fp16-nocache", "bf16")
DECODE_STEPS = 8


def _split(variant: str) -> tuple[str, bool]:
    dtype, _, cache = variant.partition("-")
    return dtype, cache != "nocache"


def _folder(ctx: Context, variant: str) -> str:
    several = sum(1 for r in ctx.formats if r.name == "onnx") > 1
    return f"onnx-{variant}" if several else "onnx"


class OnnxSink:
    consumes_stream = True

    def __init__(self, ctx: Context, variant: str, writer: Any) -> None:
        self.ctx, self.variant = ctx, variant
        self.writer = writer  # the pre-flight's OnnxWriter, its graph already traced
        self.dtype = self.writer.torch_dtype
        self.wanted = set(self.writer.wanted()) | {"lm_head.weight"}  # a tied head is checked against the embedding
        # Workers finish tensors in any order; the data file gets them in stream order, so the same inputs give the
        # same bytes. A tensor that finishes early waits here (at most the pump's few in flight).
        self.order = {t.name: i for i, t in enumerate(
            t for t in ctx.merge.tensors if t.name in self.wanted and t.dtype.is_floating_point)}
        self.pending: dict[int, Any] = {}
        self.next_index = 0
        self.lock = threading.Lock()

    def row_unit(self, tensor: StreamTensor) -> int:
        return 1

    def encoder(self, tensor: StreamTensor) -> GatheredCast | None:
        """A weight gathered whole in the graph's dtype (the graph may transpose it), handed to the writer at the end."""
        if tensor.name not in self.wanted or not tensor.dtype.is_floating_point:
            return None
        return GatheredCast(tensor, self.dtype, self.ctx.plan.check_finite, fix="export onnx:fp32 instead.",
                            done=lambda out: self.commit_in_order(tensor.name, self.writer.prepare(tensor.name, out)))

    def commit_in_order(self, name: str, prepared: Any) -> None:
        with self.lock:
            self.pending[self.order[name]] = prepared
            while self.next_index in self.pending:
                ready = self.pending.pop(self.next_index)
                if ready is not None:
                    self.writer.commit(ready)
                self.next_index += 1

    def close(self) -> list[Artifact]:
        from converters.onnx import OnnxExportError, write_genai_config

        folder = self.writer.folder
        self.writer.metadata.update({f"lora_export.sha256.{name}": digest for name, digest in {
            **self.ctx.inputs.adapter_sha256, **self.ctx.base_hashes.wait()}.items()})
        try:
            self.writer.close()
        except OnnxExportError as e:
            raise InputError(f"--to onnx:{self.variant}", f"{e}.", "export safetensors or GGUF instead.") from e
        copy_model_files(self.ctx.model_files, folder)
        if _split(self.variant)[1]:
            generation = folder / "generation_config.json"
            try:
                write_genai_config(folder, self.ctx.merged_config,
                                   json.loads(generation.read_text()) if generation.is_file() else None)
            except OnnxExportError as e:  # runs in ONNX Runtime all the same
                self.ctx.note(f"onnx:{self.variant}: no genai_config.json ({e})")
        return [Artifact("onnx", self.ctx.plan.out / folder.name, folder, variant=self.variant)]

    def abort(self) -> None:
        self.writer.abort()


def _session(path: Path) -> Any:
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), providers=providers)


def _feed(session: Any, ids: list[int], past: dict[str, np.ndarray] | None, total: int) -> dict[str, np.ndarray]:
    """One step's inputs: ``ids`` after ``total - len(ids)`` tokens already in ``past`` (empty: a prefill)."""
    feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(total - len(ids), total, dtype=np.int64)[None]}
    names = {i.name for i in session.get_inputs()}
    if past is None:
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtypes[i.type])
                for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    return {k: v for k, v in {**feed, **past}.items() if k in names}


def _run(session: Any, ids: list[int], past: dict | None, total: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    outputs = [o.name for o in session.get_outputs()]
    result = dict(zip(outputs, session.run(None, _feed(session, ids, past, total))))
    presents = {n.replace("present.", "past_key_values."): v for n, v in result.items() if n.startswith("present.")}
    return result["logits"][0].astype(np.float32), presents


class OnnxFormat(Format):
    name = "onnx"
    runtime = "onnxruntime"
    checks_key = "kv_cache"
    default_variant = "fp32"
    tolerances = {
        **{v: Tolerance(1e-3, None, None, "fp32 weights and compute in ONNX Runtime differ from the fp32 reference by "
                        "kernel summation order (measured ≤ 4e-6 on tiny models, 9e-5 on Gemma 3 270M whose logits "
                        "reach ~40); 1e-3 still fails a wrong weight or a dropped sliding window by orders of "
                        "magnitude.") for v in ("fp32", "fp32-nocache")},
        **{v: Tolerance(None, 1e-3, 0.99, "fp16 weights and compute (as optimum exports): measured KL ≤ 2e-6 and max "
                        "|Δ| ≤ 1e-2 on tiny models, KL 8e-6 and max |Δ| 0.05 on Gemma 3 270M; the distribution must "
                        "hold.") for v in ("fp16", "fp16-nocache")},
    }
    # Prefill + decode against the full recompute, relative to the largest |logit| of the recompute (at least 1):
    # the cached and uncached paths sum attention in a different order, so the error grows with the logits' size.
    # Measured: fp32 3.7e-6 of scale on Gemma 3 270M (1.5e-4 at |logit| ≈ 40), ≤ 5e-6 on tiny models; fp16 two ulps
    # of the largest logit (0.0625 at 40 = 1.6e-3 of scale). A broken cache (wrong position, stale past) is off by
    # the order of the logits themselves, far past either bound.
    DECODE_TOLERANCE = {"fp32": 5e-5, "fp16": 5e-3}

    def variants(self) -> tuple[str, ...]:
        return VARIANTS

    def prepare(self, ctx: Context, variant: str | None) -> Any:
        """The graph, traced now from the merged config (no weights): an architecture or dtype it cannot handle is
        refused before the merge, with the reason."""
        from converters.onnx import OnnxExportError, OnnxWriter

        dtype, kv_cache = _split(variant)
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise InputError(f"--to onnx:{variant}", "needs onnxruntime, which is not installed.",
                             "pip install onnxruntime (onnxruntime-gpu on GPU hosts).") from e
        folder = ctx.staging / _folder(ctx, variant)
        try:
            writer = OnnxWriter(folder, ctx.merged_config, dtype=dtype, kv_cache=kv_cache,
                                check_finite=ctx.plan.check_finite,
                                metadata={"lora_export." + k.split(".", 1)[-1] if k.startswith("general.") else k: v
                                          for k, v in provenance(ctx).items()})
        except OnnxExportError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise InputError(f"--to onnx:{variant}", f"{e}.", "export safetensors or GGUF instead, or fp32/fp16 for "
                             "bf16." if dtype == "bf16" else "export safetensors or GGUF instead.") from e
        return writer

    def output_bytes(self, ctx: Context, request: FormatRequest) -> tuple[int, int]:
        """Every float weight once in the graph's dtype, a tied embedding twice (the Gather reads it as stored, the
        output head as its transpose), each on the data file's 4 KiB alignment; and the graph file (its nodes: at
        most ~21 KB a layer and ~20 KB more for the decoders traced here, Gemma 3 the largest)."""
        itemsize = 2 if request.variant.startswith("fp16") else 4
        tensors = [t for t in ctx.layout.tensors if t.dtype.is_floating_point]
        if ctx.merged_config.get("tie_word_embeddings"):
            tensors += [t for t in ctx.layout.tensors if t.name.endswith("embed_tokens.weight")]
        data = sum(math.prod(t.shape) * itemsize + 4096 for t in tensors)
        layers = int(ctx.merged_config.get("num_hidden_layers") or ctx.merged_config.get("n_layer") or 1)
        return data + 24 * 1024 * layers + 48 * 1024, 0

    def open_sink(self, ctx: Context, request: FormatRequest) -> OnnxSink:
        return OnnxSink(ctx, request.variant, request.prepared)

    def open_runtime(self, artifact: Artifact, ctx: Context) -> OnnxRuntime:
        vocab = int(ctx.merged_config.get("vocab_size") or 32)
        return OnnxRuntime(artifact, min(vocab, ctx.layout.base_vocab or vocab), self.DECODE_TOLERANCE)

    def after_parity(self, artifact: Artifact, ctx: Context) -> None:
        """The parity figures into model.onnx's metadata_props, beside the provenance (graph only: a small file)."""
        import onnx

        path = artifact.staged / "model.onnx"
        model = onnx.load(str(path), load_external_data=False)
        assert artifact.parity is not None
        p, f = artifact.parity, artifact.parity.figures
        figures = {"runtime": p.runtime, "max_abs": f.max_abs, "kl": f.kl, "top1": f.top1,
                   "top1_decisive": f.top1_decisive, "passed": p.passed}
        model.metadata_props.add(key="lora_export.parity", value=json.dumps(figures))
        onnx.save(model, str(path))


class OnnxRuntime(ArtifactRuntime):
    """The folder in ONNX Runtime: one session (loading it reads every weight and optimises the graph) serves the
    logits and the KV-cache check, and is dropped at close()."""

    def __init__(self, artifact: Artifact, vocab: int, decode_tolerance: dict[str, float]) -> None:
        self.artifact, self.vocab, self.decode_tolerance = artifact, vocab, decode_tolerance
        self.session: Any = _session(artifact.staged / "model.onnx")

    def logits(self, probes: list[torch.Tensor]) -> torch.Tensor:
        """Each probe as a prefill from an empty past (or the plain graph), one at a time."""
        return torch.cat([torch.from_numpy(_run(self.session, p.tolist(), None, len(p))[0]) for p in probes])

    def checks(self, tokenizer: Any) -> tuple[dict | None, list[str]]:
        """With the KV cache: a prefill of 8 random ids, then DECODE_STEPS more one at a time from the presents, must
        give the full recompute's logits for every one of them."""
        dtype, kv_cache = _split(self.artifact.variant)
        if not kv_cache:
            return None, []
        session = self.session
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab, (8 + DECODE_STEPS,), generator=gen).tolist()
        full, _ = _run(session, ids, None, len(ids))
        logits, past = _run(session, ids[:8], None, 8)
        worst = float(np.abs(logits - full[:8]).max())
        for i in range(8, len(ids)):
            step, past = _run(session, [ids[i]], past, i + 1)
            worst = max(worst, float(np.abs(step[0] - full[i]).max()))
        scale = max(1.0, float(np.abs(full).max()))
        bound = self.decode_tolerance[dtype] * scale
        figures = {"decode_steps": DECODE_STEPS, "max_abs_vs_recompute": worst, "logit_scale": scale, "bound": bound}
        return figures, ([] if worst <= bound else [f"KV-cache decode differs from the recompute by {worst:.3g}"])

    def close(self) -> None:
        self.session = None


FORMAT = OnnxFormat()
