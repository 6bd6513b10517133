"""merge: the merge itself, as a MergeStream (exporter/merge_stream.py) of every output tensor in base order: adapted
weights become W + s·B@A in float32 row blocks (_merged_rows, with exporter/merge_math.py), replacements come from
the adapter, everything else passes through as stored.

The merge runs lazily, when the export stage pumps the stream: each tensor is merged once, block by block, while every
format encodes the same blocks, so the base is read once, whatever the number of formats, and peak memory stays at a
few tensors. An untouched tensor whose stored dtype is what a format writes is handed on as its location in the file
(copied by the kernel, never decoded). The stream records each merged tensor's figures and the time the pass took,
which the report books under "merge".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from converters.tensor_stream import Rows, StreamTensor, tensor_rows
from exporter.base import BaseModel
from exporter.context import Context
from exporter.errors import StageCheckError
from exporter.layout import OutputTensor, Source
from exporter.merge_math import DeltaMerge, LoraMerge
from exporter.merge_stream import MergeStream

Record = Callable[[dict[str, Any]], None]  # where a merged tensor's figures go (MergeStream.record)


def _merged_rows(ctx: Context, t: OutputTensor, record: Record, rows_per_block: int) -> Rows:
    base, adapter, module = ctx.merge_base or ctx.base, ctx.adapter, t.module
    weight = adapter.tensor(t.adapter_key) if t.adapter_key else base.tensor(t.base_name, ctx.device, reuse=True)
    merge: LoraMerge | DeltaMerge
    if ctx.combined_deltas is not None:  # several adapters combined on their full deltas: ΔW comes whole
        merge = DeltaMerge(weight, lambda: ctx.combined_deltas.delta(module.name, ctx.device), name=t.name,
                           transposed=t.layout == "conv1d", check_finite=ctx.plan.check_finite)
    else:
        merge = LoraMerge(
            weight, adapter.tensor(module.a_key), adapter.tensor(module.b_key), module.scale, name=t.name,
            fan_in_fan_out=t.layout == "conv1d", embedding=t.layout == "embedding",
            magnitude=adapter.tensor(module.magnitude_key) if module.magnitude_key else None,
            device=ctx.device, check_finite=ctx.plan.check_finite,
        )
    row_bytes = weight.numel() * weight.element_size() // max(weight.shape[0], 1)
    for start, stop, block in merge.rows(rows_per_block):
        yield start, stop, block
        if not t.adapter_key:  # the base rows merged so far need not stay in this process's memory
            base.release(t.base_name, start * row_bytes, stop * row_bytes)
    adapter.release(*(k for k in (module.a_key, module.b_key, module.magnitude_key, t.adapter_key) if k))
    low_rank = isinstance(merge, LoraMerge)  # a delta-space combination has no rank, α or scale of its own
    record(
        {"tensor": t.name, "rank": module.rank if low_rank else None, "alpha": module.alpha if low_rank else None,
         "scale": module.scale if low_rank else None, "dora": module.is_dora,
         "relative_change": merge.relative_change, "unchanged": merge.relative_change == 0.0})


def _merged_bias(ctx: Context, t: OutputTensor) -> torch.Tensor:
    bias = (ctx.merge_base or ctx.base).tensor(t.base_name).to(torch.float32)
    return bias + t.module.scale * ctx.adapter.tensor(t.module.b_bias_key).to(torch.float32)


def _released(base: BaseModel, t: OutputTensor) -> Callable[[], None] | None:
    """Dropping the base tensor's pages once every format has it (nothing when the adapter supplies the values)."""
    return (lambda: base.release(t.base_name)) if t.base_name else None


def _copied(ctx: Context, t: OutputTensor, record: Record) -> StreamTensor:
    base = ctx.merge_base or ctx.base
    return StreamTensor(t.name, t.shape, base.info(t.base_name).torch_dtype, lambda rows: base.rows(t.base_name, rows),
                        raw=base.raw(t.base_name), done=_released(base, t))


def _merged(ctx: Context, t: OutputTensor, record: Record) -> StreamTensor:
    base = ctx.merge_base or ctx.base
    original = (lambda: ctx.adapter.tensor(t.adapter_key)) if t.adapter_key else (lambda: base.tensor(t.base_name))
    return StreamTensor(t.name, t.shape, torch.float32, lambda rows: _merged_rows(ctx, t, record, rows),
                        done=_released(base, t), original=original)


def _replaced(ctx: Context, t: OutputTensor, record: Record) -> StreamTensor:
    return StreamTensor(t.name, t.shape, ctx.adapter.dtype(t.adapter_key),
                        lambda rows: tensor_rows(ctx.adapter.tensor(t.adapter_key))(rows),
                        raw=ctx.adapter.raw(t.adapter_key))


def _biased(ctx: Context, t: OutputTensor, record: Record) -> StreamTensor:
    base = ctx.merge_base or ctx.base
    return StreamTensor(t.name, t.shape, torch.float32, lambda rows: tensor_rows(_merged_bias(ctx, t))(rows),
                        done=_released(base, t))


# One way to stream each kind of output tensor (tests/test_layout.py checks every Source has one).
STREAMS: dict[Source, Callable[[Context, OutputTensor, Record], StreamTensor]] = {
    Source.COPY: _copied, Source.MERGE: _merged, Source.REPLACE: _replaced, Source.BIAS: _biased}


def stream_tensor(ctx: Context, t: OutputTensor, record: Record) -> StreamTensor:
    """One output tensor as the stream hands it to every format (``original``: the base weight an adapted tensor
    was merged into, for formats that report how much of the change survives their quantization); a merged tensor's
    figures go to ``record`` once it is done."""
    return STREAMS[t.source](ctx, t, record)


class MergeStage:
    name = "merge"

    def run(self, ctx: Context) -> None:
        stream = MergeStream([], [t.name for t in ctx.layout.tensors])
        stream.tensors = [stream_tensor(ctx, t, stream.record) for t in ctx.layout.tensors]
        ctx.merge = stream

    def check(self, ctx: Context) -> None:
        names = [t.name for t in ctx.merge.tensors]
        if len(set(names)) != len(names):
            raise StageCheckError("merge plan", "names a tensor twice.", "report this as a bug.")
