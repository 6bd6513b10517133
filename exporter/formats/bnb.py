"""safetensors:nf4 / nf4-dq / fp4 / fp4-dq / int8: the merged model re-quantized with bitsandbytes, written as the
pre-quantized folder transformers itself saves (config.json with its quantization_config), so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads it with no extra arguments.

The weights transformers would quantize (exactly nn.Linear / Conv1D modules, less its default skips: the output head,
tied weights, the last parameter, the class's fp32 modules) are quantized with bitsandbytes' own functions from the
float32 merge cast to the model's dtype — the order transformers' quantize-on-load follows — so the stored codes are
those transformers would write for the merged float model. Everything else is stored in the model's dtype. A
quantized tensor is held whole while it is quantized (double quant needs all its scales), one per worker.

Each quantized part's size depends on the data (the quant state's JSON), so parts go to a spill file as they come and
the shards are assembled at close (a kernel copy). Per adapted tensor the writer also measures how much of the merge's
change survives the quantization: ‖deq(Q(W+ΔW)) − deq(Q(W))‖ / ‖ΔW‖.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import torch

from converters.safetensors_format import DTYPE_NAMES
from converters.safetensors_out import FileSlice, ShardedWriter, TensorSpec, pwrite_all
from converters.tensor_stream import Passthrough, StreamTensor
from exporter.context import Artifact, Context
from exporter.errors import InputError
from exporter.formats.base import GatheredCast
from exporter.layout import Source
from exporter.model_files import copy_model_files

log = logging.getLogger("lora_export")

# variant -> (bits, quant type, double quant)
VARIANTS: dict[str, tuple[int, str | None, bool]] = {
    "nf4": (4, "nf4", False), "nf4-dq": (4, "nf4", True), "fp4": (4, "fp4", False), "fp4-dq": (4, "fp4", True),
    "int8": (8, None, False),
}


def require_bitsandbytes(variant: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise InputError(f"--to safetensors:{variant}", "needs bitsandbytes, which is not installed.",
                         "install lora-export[bnb] (pip install 'lora-export[bnb]').") from e


def transformers_quantized_modules(folder: Path) -> dict[str, bool]:
    """{module: is Conv1D} of the modules transformers quantizes in the model of ``folder`` (its config only)."""
    from converters.bnb import modules_not_quantized
    from exporter.parity.layerwise import skeleton

    model = skeleton(folder)
    linears = {name: type(m).__name__ == "Conv1D" for name, m in model.named_modules()
               if type(m) is torch.nn.Linear or type(m).__name__ == "Conv1D"}
    head = model.get_output_embeddings()
    output_embedding = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    skipped = modules_not_quantized(
        linears, output_embedding=output_embedding, last_parameter=list(model.named_parameters())[-1][0],
        tied_parameters=[*tied, *tied.values()], keep_in_fp32_modules=model._keep_in_fp32_modules or ())
    return {name: conv1d for name, conv1d in linears.items() if name not in skipped}


def estimated_bytes(ctx: Context, variant: str) -> tuple[int, int]:
    """Upper bounds on the folder's weight files and on the spill file they are assembled from. The files: the
    weights of the modules transformers quantizes as codes plus a float32 scale per 64-value block (4-bit) or per row
    (int8) and their quantization state, every other tensor (embeddings, the output head, norms, biases) in the model's
    dtype, and each tensor's safetensors header entry. The spill: the same parts, less the tensors copied straight
    from the base's or the adapter's file (stored in the model's dtype, unchanged: BnbSink.encoder's Passthrough)."""
    bits = VARIANTS[variant][0]
    quantized = transformers_quantized_modules(ctx.model_files)
    base = ctx.merge_base or ctx.base
    total, spilled = 4096, 0
    for t in ctx.layout.tensors:
        numel = math.prod(t.shape)
        if t.name.endswith(".weight") and t.name.removesuffix(".weight") in quantized:
            # up to six header entries (weight, absmax, quant_map, nested parts, quant_state) and the state's JSON
            data = numel * bits // 8 + (numel // 64 + 1) * 4 + t.shape[0] * 4
            total += data + 6 * (len(t.name) + 128) + 1024
            spilled += data
            continue
        total += numel * ctx.out_dtype.itemsize + len(t.name) + 128
        if t.source is Source.COPY:
            copied = base.raw(t.base_name) is not None and base.info(t.base_name).torch_dtype == ctx.out_dtype
        elif t.source is Source.REPLACE:
            copied = ctx.adapter.raw(t.adapter_key) is not None and ctx.adapter.dtype(t.adapter_key) == ctx.out_dtype
        else:
            copied = False
        if not copied:
            spilled += numel * ctx.out_dtype.itemsize
    return total, spilled


class _Spill:
    """Parts whose sizes are known only once computed, appended to one file from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0
        self.lock = threading.Lock()

    def put(self, tensor: torch.Tensor) -> FileSlice:
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        with self.lock:
            offset = self.size
            self.size += len(data)
        return FileSlice(self.path, offset, pwrite_all(self.fd, data, offset) - offset)

    def close(self) -> None:
        """Idempotent: abort() may follow a close() (another sink failed), and a descriptor number closed twice
        could by then belong to a file another thread opened."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        self.path.unlink(missing_ok=True)


class _QuantizeEncoder:
    """A weight gathered whole in float32, quantized by bitsandbytes at the end, its parts spilled."""

    needs_rows = True

    def __init__(self, sink: BnbSink, tensor: StreamTensor, conv1d: bool) -> None:
        self.sink, self.tensor, self.conv1d = sink, tensor, conv1d
        self.full = torch.empty(tensor.shape, dtype=torch.float32)

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None:
        self.full[start:stop].copy_(rows)

    def finish(self) -> None:
        module = self.tensor.name.removesuffix(".weight")
        parts = self.sink.quantize(module, self.full, self.conv1d)
        self.sink.record(self.tensor.name, {key: self.sink.spill.put(value) for key, value in parts.items()},
                         {key: (value.dtype, tuple(value.shape)) for key, value in parts.items()})
        if self.tensor.original is not None:
            self.sink.measure_survival(module, self.tensor.name, self.full, parts, self.tensor.original(), self.conv1d)


class BnbSink:
    consumes_stream = True

    def __init__(self, ctx: Context, variant: str) -> None:
        from converters.bnb import quantization_config

        self.ctx, self.variant = ctx, variant
        self.bits, self.quant_type, self.double_quant = VARIANTS[variant]
        self.model_dtype = ctx.out_dtype
        self.folder = ctx.staging / variant
        self.folder.mkdir()
        self.quantized = transformers_quantized_modules(ctx.model_files)
        self.config = {**ctx.merged_config, "quantization_config": quantization_config(
            self.bits, quant_type=self.quant_type or "fp4", double_quant=self.double_quant)}
        self.spill = _Spill(self.folder / ".parts.spill")
        self.parts: dict[str, dict[str, FileSlice]] = {}  # output tensor -> {checkpoint key: where its bytes are}
        self.layouts: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}  # checkpoint key -> dtype, shape
        self.survival: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def quantize(self, module: str, weight: torch.Tensor, conv1d: bool) -> dict[str, torch.Tensor]:
        from converters.bnb import quantize_4bit, quantize_int8

        # On the run's merge device, as transformers quantizes on the device it loads to (bitsandbytes' CPU and CUDA
        # quantizers are separate code); the parts come back to the CPU, where they are measured and written.
        if self.bits == 8:
            parts = quantize_int8(module, weight, model_dtype=self.model_dtype, conv1d=conv1d, device=self.ctx.device)
        else:
            parts = quantize_4bit(module, weight, model_dtype=self.model_dtype, quant_type=self.quant_type,
                                  double_quant=self.double_quant, conv1d=conv1d, device=self.ctx.device)
        return {key: value.cpu() for key, value in parts.items()}

    def dequantize(self, module: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        from converters.bnb import dequantize, group_tensors

        entry = next(e for e in group_tensors(parts) if e.name == f"{module}.weight")
        return dequantize(entry, parts.__getitem__).float()

    def measure_survival(self, module: str, name: str, merged: torch.Tensor, parts: dict[str, torch.Tensor],
                         original: torch.Tensor, conv1d: bool) -> None:
        """‖deq(Q(W+ΔW)) − deq(Q(W))‖ / ‖ΔW‖: the share of the merge's change this quantization keeps."""
        base = original.to(torch.float32)
        delta = float(torch.linalg.vector_norm(merged - base))
        if delta == 0:
            return
        kept = self.dequantize(module, parts) - self.dequantize(module, self.quantize(module, base, conv1d))
        with self.lock:
            self.survival.append({"tensor": name, "kept": float(torch.linalg.vector_norm(kept)) / delta})

    def record(self, name: str, parts: dict[str, FileSlice], layouts: dict[str, tuple]) -> None:
        with self.lock:
            self.parts[name] = parts
            self.layouts.update(layouts)

    # -- TensorWriter ---------------------------------------------------------------------------------------------
    def row_unit(self, tensor: StreamTensor) -> int:
        return 1

    def encoder(self, tensor: StreamTensor) -> Any:
        module = tensor.name.removesuffix(".weight")
        if tensor.name.endswith(".weight") and module in self.quantized:
            return _QuantizeEncoder(self, tensor, self.quantized[module])
        if tensor.raw is not None and tensor.dtype == self.model_dtype:
            return Passthrough(lambda: self.record(tensor.name, {tensor.name: tensor.raw},
                                                   {tensor.name: (tensor.dtype, tuple(tensor.shape))}))
        return GatheredCast(tensor, self.model_dtype, self.ctx.plan.check_finite,  # kept in the model's dtype
                            lambda out: self.record(tensor.name, {tensor.name: self.spill.put(out)},
                                                    {tensor.name: (out.dtype, tuple(out.shape))}))

    # -------------------------------------------------------------------------------------------------------------
    def close(self) -> list[Artifact]:
        import json

        order = [key for t in self.ctx.layout.tensors for key in self.parts[t.name]]
        specs = [TensorSpec(key, DTYPE_NAMES[self.layouts[key][0]], self.layouts[key][1]) for key in order]
        writer = ShardedWriter(self.folder, specs, self.ctx.plan.max_shard_size, metadata={"lora_export": "merged"})
        try:
            for t in self.ctx.layout.tensors:
                for key, where in self.parts[t.name].items():
                    writer.copy_from(key, where)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        self.spill.close()
        copy_model_files(self.ctx.model_files, self.folder)
        (self.folder / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        kept = [s["kept"] for s in self.survival]
        n_quantized = sum(1 for t in self.ctx.layout.tensors if t.name.removesuffix(".weight") in self.quantized)
        summary = {"quantized_tensors": n_quantized, "float_tensors": len(self.ctx.layout.tensors) - n_quantized,
                   "delta_kept_min": min(kept, default=None),
                   "delta_kept_mean": sum(kept) / len(kept) if kept else None,
                   "per_tensor": sorted(self.survival, key=lambda s: s["tensor"])}
        log.info("requantize %s: %d tensors quantized with bitsandbytes, %d kept in %s; share of each merged change "
                 "kept: min %s, mean %s", self.variant, n_quantized, summary["float_tensors"], self.model_dtype,
                 f"{summary['delta_kept_min']:.2f}" if kept else "-", f"{summary['delta_kept_mean']:.2f}" if kept
                 else "-")
        return [Artifact("safetensors", self.ctx.plan.out / self.variant, self.folder, variant=self.variant,
                         details={"requantize": summary})]

    def abort(self) -> None:
        try:
            self.spill.close()
        except OSError:
            pass
