"""safetensors: the merged model as a Hugging Face folder (shards + index, config, generation config, tokenizer),
in --dtype (default: the base's), in the output folder itself. Parity loads it with transformers.

Each tensor is cast once from the merge's float32 rows; a tensor the adapter leaves alone whose dtype is already the
output's is copied byte for byte by the kernel, never decoded.

Variants nf4, nf4-dq, fp4, fp4-dq and int8 re-quantize the merge with bitsandbytes (exporter/formats/bnb.py) into
a subfolder of that name; parity runs them in transformers + bitsandbytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from converters.safetensors_format import SINGLE_NAME
from converters.safetensors_in import read_header, weight_map
from converters.safetensors_out import ShardedWriter
from converters.tensor_stream import Passthrough, StreamTensor, workspace
from exporter.context import Artifact, Context, FormatRequest
from exporter.errors import InputError, StageCheckError
from exporter.formats.base import ArtifactRuntime, Format, LogitsRuntime
from exporter.merge_math import cast_rows
from exporter.model_files import copy_model_files
from exporter.parity.runtimes import transformers_folder_logits
from exporter.parity.tolerances import Tolerance


class _CastEncoder:
    """The tensor in the output dtype, cast once from each block of rows and written at its place."""

    needs_rows = True

    def __init__(self, writer: ShardedWriter, tensor: StreamTensor, dtype: torch.dtype, check_finite: bool) -> None:
        self.writer, self.name, self.dtype, self.check_finite = writer, tensor.name, dtype, check_finite
        self.row_bytes = (math.prod(tensor.shape[1:]) if len(tensor.shape) > 1 else 1) * dtype.itemsize

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None:
        out = workspace(self.dtype, rows.numel()).view(rows.shape)
        cast_rows(out, rows, self.name, self.check_finite)
        self.writer.write_at(self.name, memoryview(out.reshape(-1).view(torch.uint8).numpy()), start * self.row_bytes)

    def finish(self) -> None:
        """Completeness is the writer's to check when it closes."""


class SafetensorsSink:
    consumes_stream = True

    def __init__(self, ctx: Context, folder: Path) -> None:
        self.ctx, self.folder = ctx, folder
        self.dtypes = {t.name: t.dtype for t in ctx.layout.tensors}
        self.specs = [t.spec() for t in ctx.layout.tensors]
        self.writer = ShardedWriter(folder, self.specs, ctx.plan.max_shard_size, metadata={"lora_export": "merged"})

    def row_unit(self, tensor: StreamTensor) -> int:
        return 1

    def encoder(self, tensor: StreamTensor) -> Passthrough | _CastEncoder:
        dtype = self.dtypes[tensor.name]
        if tensor.raw is not None and tensor.dtype == dtype:
            return Passthrough(lambda: self.writer.copy_from(tensor.name, tensor.raw))
        return _CastEncoder(self.writer, tensor, dtype, self.ctx.plan.check_finite)

    def close(self) -> list[Artifact]:
        self.writer.close()
        copy_model_files(self.ctx.model_files, self.folder)
        self._check_written()
        variant = str(self.ctx.out_dtype).replace("torch.", "")
        return [Artifact("safetensors", self.ctx.plan.out, self.folder, variant=variant)]

    def abort(self) -> None:
        """Its files closed; the folder is the run's staging folder, which the runner removes."""
        self.writer.abort()

    def _check_written(self) -> None:
        """Read back the headers: every planned tensor, with its shape and dtype, in the file the index names."""
        index = weight_map(self.folder) or {spec.name: SINGLE_NAME for spec in self.specs}
        found = {}
        for file_name in sorted(set(index.values())):
            infos, _, _ = read_header(self.folder / file_name)
            found.update({name: (info.dtype, info.shape, file_name) for name, info in infos.items()})
        for spec in self.specs:
            got = found.get(spec.name)
            if got is None or got[:2] != (spec.dtype, spec.shape) or index.get(spec.name) != got[2]:
                raise StageCheckError(str(self.folder), f"tensor '{spec.name}' was not written as planned ({got}).",
                                      "report this as a bug.")
        if len(found) != len(self.specs):
            raise StageCheckError(str(self.folder), "holds tensors that were not planned.", "report this as a bug.")


class SafetensorsFormat(Format):
    name = "safetensors"
    runtime = "transformers"
    tolerances = {
        "float32": Tolerance(
            1e-3, None, None,
            "fp32 weights in fp32 differ from the fp32 reference only by summation order: ~1e-6 on tiny models, 1.6e-4 "
            "on Gemma 3 270M (logits up to ~40; PEFT's own fp32 merge measures 1.1e-4 there). 1e-3 clears that noise "
            "and still fails a wrong scale by orders of magnitude."),
        "bfloat16": Tolerance(
            None, 1e-3, 0.99,
            "bf16 storage keeps 8 mantissa bits, so logits move by ~1e-2 and near-ties flip; the distribution must "
            "not. Run with float32 compute (see open_runtime), PEFT's own bf16 merge of Gemma 3 270M measures KL ≈ 1e-4."),
        "float16": Tolerance(
            None, 1e-3, 0.99,
            "fp16 storage rounds weights to 11 mantissa bits: smaller error than bf16, judged the same way."),
    }

    # bitsandbytes variants; each measured on tiny llama-shaped models and Gemma 3 270M with trained adapters (README).
    tolerances = {**tolerances, **{variant: Tolerance(
        None, None, None, "4-bit weights (NF4/FP4 in blocks of 64) round a small adapter away (measured: Gemma 3 "
        "270M QLoRA re-quantized keeps 22% of the adapter's effect, KL 2.0): how much survives is judged by "
        "--min-effect-kept; it fails only as a broken file would, 1 nat further from the reference than the base is.",
        broken_kl=1.0) for variant in ("nf4", "nf4-dq", "fp4", "fp4-dq")},
        "int8": Tolerance(None, 5e-2, 0.95, "LLM.int8 rows: 8-bit like GGUF q8_0, judged the same way.")}

    def variants(self) -> tuple[str, ...]:
        from exporter.formats.bnb import VARIANTS

        return tuple(VARIANTS)

    def prepare(self, ctx: Context, variant: str | None) -> None:
        if variant is not None:
            from transformers import CONFIG_MAPPING

            from exporter.formats.bnb import require_bitsandbytes

            require_bitsandbytes(variant)
            if ctx.merged_config.get("model_type") not in CONFIG_MAPPING:  # its module types come from transformers
                raise InputError(str(ctx.base.path / "config.json"), f"model_type '{ctx.merged_config.get('model_type')}'"
                                 " is not one transformers builds, so which of its modules transformers would quantize "
                                 "is unknown.", "export --to safetensors (float) instead.")

    def output_bytes(self, ctx: Context, request: FormatRequest) -> tuple[int, int]:
        variant = request.variant
        if variant is None:  # the weights, each tensor's entry in its shard's JSON header and in the shard index
            return sum(t.spec().nbytes + 2 * len(t.name) + 192 for t in ctx.layout.tensors) + 4096, 0
        from exporter.formats.bnb import estimated_bytes

        return estimated_bytes(ctx, variant)  # the parts are spilled, then assembled into the shards

    def open_sink(self, ctx: Context, request: FormatRequest) -> Any:
        if request.variant is None:
            return SafetensorsSink(ctx, ctx.staging)
        from exporter.formats.bnb import BnbSink

        return BnbSink(ctx, request.variant)

    def open_runtime(self, artifact: Artifact, ctx: Context) -> ArtifactRuntime:
        """The folder's weights exactly as stored, computed in float32 (whole or layer by layer).

        float32 compute makes the figures measure the artifact (the merge and the rounding of its weights), not bf16
        arithmetic: running Gemma 3 270M's *unmodified* base in bf16 already gives KL ≈ 1e-2 against fp32 on
        random-token probes, the same for any bf16 model, PEFT's own merge included.
        """
        if artifact.variant in ("float32", "bfloat16", "float16"):
            return LogitsRuntime(lambda probes: transformers_folder_logits(artifact.staged, ctx, probes,
                                                                           "parity safetensors"))
        return LogitsRuntime(lambda probes: _bitsandbytes_logits(artifact, ctx, probes))


def _bitsandbytes_logits(artifact: Artifact, ctx: Context, probes: list[torch.Tensor]) -> torch.Tensor:
    """A bitsandbytes folder as users load it: transformers with no arguments but the device, computing as its
    quantization_config says. A quantized model is a fraction of the float one, so it is held whole."""
    from transformers import AutoModelForCausalLM

    from exporter.parity.layerwise import probe_logits

    model = AutoModelForCausalLM.from_pretrained(artifact.staged, device_map=str(ctx.device),
                                                 trust_remote_code=False).eval()
    try:
        return probe_logits(model, probes, ctx.device)
    finally:
        del model


FORMAT = SafetensorsFormat()
