"""peft: several adapters combined in adapter space (exporter/combine.py), written as one PEFT adapter folder
(``adapter/``: adapter_config.json + adapter_model.safetensors, float32), for those who serve adapters rather than
merged models (vLLM, PEFT, TGI load it as any adapter of the base). It needs no merge: it is written from the
combined adapter's tensors. A delta-space combination has no adapter form (refused by the plan); a single adapter
needs no conversion (its own folder is the thing).

Parity applies the written folder on the fly to the float32 base (exporter/parity/reference.py, which reads the
files as PEFT lays them out: keys, r, lora_alpha), so it checks that the folder says what was combined: for sum and
cat against every input adapter applied with its weight. tests/test_combine.py loads it with PEFT itself.
"""

from __future__ import annotations

import math

import torch

from exporter.context import Artifact, Context, FormatRequest
from exporter.errors import InputError
from exporter.formats.base import ArtifactRuntime, Format, LogitsRuntime
from exporter.parity.tolerances import Tolerance

FOLDER_NAME = "adapter"


class PeftSink:
    consumes_stream = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.staged = ctx.staging / FOLDER_NAME

    def close(self) -> list[Artifact]:
        from exporter.combine import write_peft_adapter

        assert self.ctx.combination is not None
        write_peft_adapter(self.ctx.adapter, self.ctx.combination["rank"], self.staged)
        return [Artifact("peft", self.ctx.plan.out / FOLDER_NAME, self.staged, variant="float32")]

    def abort(self) -> None:
        import shutil

        shutil.rmtree(self.staged, ignore_errors=True)


class PeftFormat(Format):
    name = "peft"
    runtime = "transformers+lora"
    tolerances = {"float32": Tolerance(
        1e-3, None, None, "the combined adapter in float32, applied on the fly in float32: as exact as the "
        "float32 merge.")}

    def prepare(self, ctx: Context, variant: str | None) -> None:
        if ctx.combination is None:
            raise InputError("--to peft", "writes a combination of several adapters as one adapter; with one "
                             "adapter there is nothing to combine (its own folder is the PEFT adapter).",
                             "pass several --adapter with --combine, or drop peft from --to.")

    def output_bytes(self, ctx: Context, request: FormatRequest) -> tuple[int, int]:
        """Every module at the combined rank in float32 (shorter modules padded with zeros), the config beside."""
        rank = ctx.combination["rank"] if ctx.combination else 0
        size = 0
        for module in ctx.adapter.modules.values():
            a, b = ctx.adapter.shape(module.a_key), ctx.adapter.shape(module.b_key)
            size += 4 * rank * (math.prod(a[1:]) + b[0]) + 2 * (len(module.a_key) + len(module.b_key)) + 256
        return size + 64 * 1024, 0

    def open_sink(self, ctx: Context, request: FormatRequest) -> PeftSink:
        return PeftSink(ctx)

    def open_runtime(self, artifact: Artifact, ctx: Context) -> ArtifactRuntime:
        return LogitsRuntime(lambda probes: self._logits(artifact, ctx, probes))

    @staticmethod
    def _logits(artifact: Artifact, ctx: Context, probes: list[torch.Tensor]) -> torch.Tensor:
        from exporter.parity.layerwise import probe_logits
        from exporter.parity.reference import BaseModelTensors, load_reference

        base = ctx.base
        model = load_reference(base.path, [(artifact.staged, 1.0)], ctx.device, mode=ctx.parity_mode,
                               base_tensors=BaseModelTensors(base) if base.quantization is not None else None)
        try:
            return probe_logits(model, probes, ctx.device)
        finally:
            del model


FORMAT = PeftFormat()
