"""One stream of tensors, many writers: each tensor is produced once, in row blocks, and every writer encodes the same
blocks into its own type; the encoded tensors are then written strictly in order.

A ``StreamTensor`` is lazy: its rows are computed (a merge, a dequantization) only when a writer asks for them, on a
worker thread, one block of about BLOCK_VALUES values at a time, so the block is still in cache when the writers
convert it. Where every writer can take the stored bytes as they are (``raw``), nothing is computed at all: the kernel
copies the bytes. ``pump`` runs it: one tensor per core (single-threaded torch each, see ordered_pool.py), at most two
tensors per core in flight, so memory holds a few tensors whatever the model's size or the number of writers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol, Union

import numpy as np
import torch

from converters.ordered_pool import ordered_map, single_threaded_torch
from converters.safetensors_in import SafetensorsFile
from converters.safetensors_out import FileSlice

# About 1M values (4 MiB of float32) per block: it stays in cache between being computed and being encoded by every
# writer (measured on the merge: 1.6 GB/s of bf16 in blocks vs 0.34 GB/s in whole-tensor passes, 2 cores).
BLOCK_VALUES = 1 << 20

Payload = Union[bytes, memoryview, np.ndarray, FileSlice]
Rows = Iterator[tuple[int, int, torch.Tensor]]  # (first row, end row, the rows): valid until the next block


@dataclass(frozen=True)
class StreamTensor:
    """One output tensor. ``produce(rows_per_block)`` yields its leading-dimension rows in order (a 0-d or 1-D tensor
    comes as one block of shape (n,)); ``dtype`` is the dtype those rows arrive in (float32 for computed tensors, the
    stored dtype for tensors passed through). ``raw`` locates the stored bytes when they are the tensor as it is."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[int], Rows]
    raw: FileSlice | None = None
    done: Callable[[], None] | None = None  # called once every writer has the tensor (e.g. release its mmap pages)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rows(self, row_unit: int = 1, block_values: int = BLOCK_VALUES) -> Rows:
        """Blocks of about ``block_values`` values, each a whole multiple of ``row_unit`` rows."""
        per_row = math.prod(self.shape[1:]) if len(self.shape) > 1 else max(1, self.numel)
        rows = max(1, block_values // max(1, per_row * row_unit)) * row_unit
        return self.produce(rows)


def tensor_rows(tensor: torch.Tensor) -> Callable[[int], Rows]:
    """``produce`` for a tensor already at hand (a memory-mapped view, or a small computed one)."""

    def produce(rows_per_block: int) -> Rows:
        t = tensor.reshape(-1) if tensor.dim() <= 1 else tensor
        for start in range(0, max(t.shape[0], 1), rows_per_block):
            stop = min(start + rows_per_block, t.shape[0])
            yield start, stop, t[start:stop]

    return produce


class Encoder(Protocol):
    """A writer's conversion of one tensor: fed every block (unless ``needs_rows`` is False), then finished."""

    needs_rows: bool

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None: ...

    def finish(self) -> Payload: ...


class TensorWriter(Protocol):
    """A file format fed by the stream: an encoder per tensor (None: the format has no place for it), then ordered
    writes of what the encoders produced."""

    def row_unit(self, tensor: StreamTensor) -> int: ...

    def encoder(self, tensor: StreamTensor) -> Encoder | None: ...

    def write(self, name: str, payload: Payload) -> None: ...


class Passthrough:
    """The stored bytes as they are (the writer's type equals the stored one): copied by the kernel, never decoded."""

    needs_rows = False

    def __init__(self, raw: FileSlice) -> None:
        self.raw = raw

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None:
        raise AssertionError("a pass-through takes no rows")

    def finish(self) -> Payload:
        return self.raw


def payload_size(payload: Payload) -> int:
    if isinstance(payload, FileSlice):
        return payload.length
    if isinstance(payload, np.ndarray):
        return payload.nbytes
    return len(memoryview(payload).cast("B"))


def _encode_all(tensor: StreamTensor, writers: Sequence[TensorWriter], block_values: int) -> list[Payload | None]:
    encoders = [w.encoder(tensor) for w in writers]
    rowed = [(w, e) for w, e in zip(writers, encoders) if e is not None and e.needs_rows]
    if rowed:
        unit = math.lcm(*(w.row_unit(tensor) for w, _ in rowed))
        for start, stop, rows in tensor.rows(unit, block_values):
            for _, encoder in rowed:
                encoder.add(start, stop, rows)
    return [e.finish() if e is not None else None for e in encoders]


def pump(tensors: Iterable[StreamTensor], writers: Sequence[TensorWriter], workers: int = 1,
         on_written: Callable[[StreamTensor, int], None] | None = None, block_values: int = BLOCK_VALUES) -> None:
    """Encode every tensor for every writer (``workers`` tensors at a time) and write them in order. ``on_written``
    gets each tensor and the bytes written for it (for progress)."""
    parallel = single_threaded_torch() if workers > 1 else nullcontext()
    with parallel:
        encode = functools.partial(_encode_all, writers=writers, block_values=block_values)
        for tensor, payloads in ordered_map(encode, tensors, workers):
            written = 0
            for writer, payload in zip(writers, payloads):
                if payload is not None:
                    writer.write(tensor.name, payload)
                    written += payload_size(payload)
            if tensor.done is not None:
                tensor.done()
            if on_written is not None:
                on_written(tensor, written)


def file_tensors(files: Sequence[SafetensorsFile]) -> list[StreamTensor]:
    """Every tensor of these safetensors files, in file order, as stored: zero-copy views of the memory map, the
    stored bytes as ``raw``, and their pages released from this process once written."""
    tensors = []
    for file in files:
        for info in sorted(file.tensors.values(), key=lambda t: t.begin):
            tensors.append(StreamTensor(
                info.name, info.shape, info.torch_dtype,
                functools.partial(lambda f, n, rows: tensor_rows(f.tensor(n))(rows), file, info.name),
                raw=FileSlice(file.path, info.begin, info.nbytes), done=functools.partial(file.release, info.name)))
    return tensors
