"""merge: stream the base tensor by tensor; adapted tensors become W + s·B@A (fp32, cast once), others pass through.

Nothing is computed here until the export stage pulls the stream, so peak memory is a few tensors, never the model.
Untouched tensors in the output dtype are handed on as raw bytes from the memory map: no decode, no copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from tqdm import tqdm

from converters.ordered_pool import default_workers, ordered_map, single_threaded_torch
from converters.safetensors_out import FileSlice, Payload
from exporter.errors import StageCheckError
from exporter.layout import OutputTensor
from exporter.merge_math import merge_lora
from exporter.pipeline import Context

log = logging.getLogger("lora_export")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in safetensors order (row-major, little-endian) without a copy when contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _merged(ctx: Context, t: OutputTensor) -> torch.Tensor:
    base, adapter, module = ctx.base, ctx.adapter, t.module
    weight = adapter.tensor(t.adapter_key) if t.adapter_key else base.tensor_file[t.base_name].tensor(t.base_name)
    result = merge_lora(
        weight, adapter.tensor(module.a_key), adapter.tensor(module.b_key), module.scale, name=t.name,
        out_dtype=t.dtype, fan_in_fan_out=t.layout == "conv1d", embedding=t.layout == "embedding",
        magnitude=adapter.tensor(module.magnitude_key) if module.magnitude_key else None,
        device=ctx.device, check_finite=ctx.plan.check_finite,
    )
    # "Changed nothing measurable" means the stored values are identical after the cast: compare only when the
    # relative change is below the output dtype's resolution, the only case where that is possible.
    unchanged = (result.relative_change < torch.finfo(t.dtype).eps
                 and torch.equal(result.weight.cpu(), weight.to(t.dtype)))
    ctx.report.setdefault("merge", []).append(
        {"tensor": t.name, "rank": module.rank, "alpha": module.alpha, "scale": module.scale,
         "dora": module.is_dora, "relative_change": result.relative_change, "unchanged": unchanged})
    return result.weight


def _merged_bias(ctx: Context, t: OutputTensor) -> torch.Tensor:
    bias = ctx.base.tensor_file[t.base_name].tensor(t.base_name).to(torch.float32)
    lora_bias = ctx.adapter.tensor(t.module.b_bias_key).to(torch.float32)
    return (bias + t.module.scale * lora_bias).to(t.dtype)


def produce(ctx: Context, t: OutputTensor) -> Payload:
    """The bytes of one output tensor (or, for an untouched tensor, where to copy them from)."""
    if t.source == "copy":
        source = ctx.base.tensor_file[t.base_name]
        info = source.info(t.base_name)
        if info.torch_dtype == t.dtype:
            return FileSlice(source.path, info.begin, info.nbytes)
        return tensor_bytes(source.tensor(t.base_name).to(t.dtype))
    if t.source == "merge":
        return tensor_bytes(_merged(ctx, t).cpu())
    if t.source == "replace":
        return tensor_bytes(ctx.adapter.tensor(t.adapter_key).to(t.dtype))
    if t.source == "bias":
        return tensor_bytes(_merged_bias(ctx, t))
    raise AssertionError(f"unknown tensor source {t.source}")


class MergeStage:
    name = "merge"

    def run(self, ctx: Context) -> None:
        tensors = ctx.layout.tensors
        ctx.tensor_specs = [t.spec() for t in tensors]
        ctx.tensor_stream = self._stream(ctx, tensors)

    def _stream(self, ctx: Context, tensors: list[OutputTensor]) -> Iterator[tuple[str, Payload]]:
        """Tensors in order. On the CPU, one tensor per core is produced at a time, each with single-threaded torch
        (see converters/ordered_pool.py); at most 2 tensors per core are in flight, so memory stays at a few."""
        total = sum(s.nbytes for s in ctx.tensor_specs)
        workers = default_workers() if ctx.device.type == "cpu" else 1
        with tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not ctx.plan.progress,
                  leave=False) as bar, (single_threaded_torch() if workers > 1 else nullcontext()):
            for t, data in ordered_map(lambda t: produce(ctx, t), tensors, workers):
                yield t.name, data
                bar.update(data.length if isinstance(data, FileSlice) else len(data))
                if t.base_name is not None:  # written: its pages need not stay in our resident memory
                    ctx.base.tensor_file[t.base_name].release(t.base_name)
        order = {t.name: i for i, t in enumerate(tensors)}
        merged = sorted(ctx.report.get("merge", []), key=lambda m: order[m["tensor"]])  # workers append in any order
        ctx.report["merge"] = merged
        if merged and all(m["unchanged"] for m in merged):
            ctx.note("the adapter changes nothing measurable: every merged tensor equals the base after the cast "
                     "to the output dtype (an untrained adapter with lora_B = 0, or a scale of 0?)")

    def check(self, ctx: Context) -> None:
        names = [s.name for s in ctx.tensor_specs]
        if len(set(names)) != len(names):
            raise StageCheckError("merge plan", "names a tensor twice.", "report this as a bug.")
        if ctx.tensor_stream is None:
            raise StageCheckError("merge plan", "produced no tensor stream.", "report this as a bug.")
