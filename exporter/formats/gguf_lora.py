"""gguf-lora: the adapter itself as a GGUF for llama.cpp's --lora (and Ollama's ADAPTER), each module's scale folded
into B so rsLoRA and rank/alpha patterns come out right. It needs no merge: it is written from the adapter's tensors.
DoRA, modules_to_save, embedding LoRA and lora_bias cannot be expressed and are refused before anything runs.
Several adapters without --combine are written one file each (``adapter-<folder name>.gguf``), each checked against
the base with that adapter alone; a combination (adapter space) is one file of the combined adapter.

Parity runs the base as an F32 GGUF (written to the staging folder, streamed from the base's shards tensor by tensor,
then deleted) with this adapter applied by llama.cpp at run time.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import torch

from exporter.adapter import Adapter
from exporter.context import Artifact, Context, FormatRequest
from exporter.errors import InputError
from exporter.formats.base import ArtifactRuntime, Format, LogitsRuntime
from exporter.formats.gguf import GELU_ARCHITECTURES, GELU_F32, gguf_vocab
from exporter.model_files import TOKENIZER_FILES, copy_tokenizer, provenance
from exporter.parity.runtimes import llama_cpp_logits
from exporter.parity.tolerances import Tolerance

FILE_NAME = "adapter.gguf"


def _adapters(ctx: Context) -> list[Adapter]:
    return ctx.separate_adapters or [ctx.adapter]


def file_names(ctx: Context) -> list[str]:
    """adapter.gguf, or one adapter-<folder name>.gguf per adapter kept apart (numbered where names repeat)."""
    if not ctx.separate_adapters:
        return [FILE_NAME]
    stems = [re.sub(r"[^A-Za-z0-9._-]+", "-", a.path.name) or "adapter" for a in ctx.separate_adapters]
    return [f"adapter-{stem}.gguf" if stems.count(stem) == 1 else f"adapter-{i + 1}-{stem}.gguf"
            for i, stem in enumerate(stems)]


class GGUFLoraSink:
    consumes_stream = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.staged = [ctx.staging / name for name in file_names(ctx)]

    def close(self) -> list[Artifact]:
        from converters.gguf.lora import LoraPair, write_gguf_lora

        artifacts = []
        for adapter, staged in zip(_adapters(self.ctx), self.staged):
            pairs = [LoraPair(m.weight_name, adapter.tensor(m.a_key), adapter.tensor(m.b_key), m.scale)
                     for m in adapter.modules.values()]
            write_gguf_lora(self.ctx.base.config, pairs, staged, metadata=provenance(self.ctx))
            artifacts.append(Artifact("gguf-lora", self.ctx.plan.out / staged.name, staged, variant="f32",
                                      details={"adapter": str(adapter.path)} if self.ctx.separate_adapters else {}))
        return artifacts

    def abort(self) -> None:
        for staged in self.staged:
            staged.unlink(missing_ok=True)


class GGUFLoraFormat(Format):
    name = "gguf-lora"
    runtime = "llama.cpp+lora"
    tolerances = {"f32": Tolerance(
        1e-3, None, None, "an f32 base GGUF with the f32 adapter applied at run time: as exact as gguf f32.")}
    arch_tolerances = {("f32", arch): GELU_F32 for arch in GELU_ARCHITECTURES}

    def prepare(self, ctx: Context, variant: str | None) -> None:
        from converters.gguf.arch import ArchError, arch_for, gguf_tensor_name, hyperparameters, metadata_keys

        if ctx.base.quantization is not None:
            raise InputError(str(ctx.base.path), "is a bitsandbytes-quantized model; a GGUF LoRA is applied at run "
                             "time to a GGUF of the base, which llama.cpp cannot make from bitsandbytes weights.",
                             "export the merged model instead: --to gguf.")
        for adapter in _adapters(ctx):
            refusals = []
            if adapter.use_dora:
                refusals.append("DoRA (llama.cpp's LoRA has no magnitude vector)")
            if adapter.replacements:
                refusals.append(f"modules_to_save ({', '.join(sorted(adapter.replacements))})")
            if any(m.kind == "embedding" for m in adapter.modules.values()):
                refusals.append("embedding LoRA")
            if any(m.b_bias_key for m in adapter.modules.values()):
                refusals.append("lora_bias")
            if refusals:
                raise InputError(str(adapter.path), f"uses {', '.join(refusals)}, which a GGUF LoRA cannot express.",
                                 "export the merged model instead: --to gguf.")
        try:
            spec, hp = arch_for(ctx.base.config), hyperparameters(ctx.base.config)
            # every hyperparameter llama.cpp needs, checked now as for --to gguf (the adapter runs on such a GGUF)
            metadata_keys(spec, hp)
            for module in (m for adapter in _adapters(ctx) for m in adapter.modules.values()):
                name = gguf_tensor_name(spec, hp, module.weight_name)
                if name is None or name.startswith("token_embd"):
                    raise ArchError(f"'{module.weight_name}' cannot carry a LoRA in llama.cpp's {spec.name} graph")
        except ArchError as e:
            raise InputError(str(ctx.base.path / "config.json"), f"{e}.", "export the merged model instead.") from e

    def output_bytes(self, ctx: Context, request: FormatRequest) -> tuple[int, int]:
        """The adapter in f32; with parity on, the base as an F32 GGUF beside it while llama.cpp runs them (its tensors
        on the 32-byte alignment with their tensor infos, its vocabulary with a placeholder per padding row, the other
        metadata)."""
        from gguf import GGUFWriter

        size = sum(4096 + sum(4 * math.prod(adapter.shape(k)) for m in adapter.modules.values()
                              for k in (m.a_key, m.b_key)) for adapter in _adapters(ctx))  # a file each
        base_f32 = 0
        if ctx.plan.parity:
            base_f32 = sum(GGUFWriter.ggml_pad(4 * math.prod(t.shape), 32) + len(t.name) + 64
                           for t in ctx.base.tensors.values()) + 64 * 1024
            if ctx.tokenizer_dir is not None:
                vocab = gguf_vocab(ctx)
                padding_rows = max(0, (ctx.layout.base_vocab or 0) - len(vocab.tokens))
                base_f32 += vocab.metadata_bytes() + 32 * padding_rows  # "[PAD123456]": its bytes, length, type, score
        return size, base_f32

    def open_sink(self, ctx: Context, request: FormatRequest) -> GGUFLoraSink:
        return GGUFLoraSink(ctx)

    def open_runtime(self, artifact: Artifact, ctx: Context) -> ArtifactRuntime:
        return LogitsRuntime(lambda probes: self._logits(artifact, ctx, probes))

    @staticmethod
    def _logits(artifact: Artifact, ctx: Context, probes: list[torch.Tensor]) -> torch.Tensor:
        """The adapter applied by llama.cpp (--lora) to an F32 GGUF of the base, written here and removed after."""
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
            return llama_cpp_logits(base_gguf, probes, lora_path=artifact.staged)
        finally:
            base_gguf.unlink(missing_ok=True)


FORMAT = GGUFLoraFormat()
