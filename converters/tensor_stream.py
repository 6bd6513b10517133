"""One stream of tensors, many writers: each tensor is produced once, in row blocks, and every writer encodes the same
blocks into its own type and writes them at their place in its file.

A ``StreamTensor`` is lazy: its rows are computed (a merge, a dequantization) only when a writer asks for them, on a
worker thread, one block of about BLOCK_VALUES values at a time, so the block is still in cache when each writer
converts it and writes it (positional writes: formats whose layout is planned up front need no ordering and no
whole-tensor buffer). Where a writer can take the stored bytes as they are (``raw``), nothing is computed for it: the
kernel copies the bytes. ``pump`` runs it: one tensor per core (single-threaded torch each, see ordered_pool.py), at
most two tensors per core in flight, so memory holds a few blocks per writer whatever the model's size.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from converters.ordered_pool import ordered_map, single_threaded_torch
from converters.safetensors_in import SafetensorsFile
from converters.safetensors_out import FileSlice

# About 1M values (4 MiB of float32) per block: it stays in cache between being computed and being encoded by every
# writer (measured on the merge: 1.6 GB/s of bf16 in blocks vs 0.34 GB/s in whole-tensor passes, 2 cores).
BLOCK_VALUES = 1 << 20

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
    original: Callable[[], torch.Tensor] | None = None  # for a computed tensor: what it was computed from (the base
    # weight before a merge), for writers that report what of the change survives their quantization

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rows(self, row_unit: int = 1, block_values: int = BLOCK_VALUES) -> Rows:
        """Blocks of about ``block_values`` values, each a whole multiple of ``row_unit`` rows (a 1-D tensor's rows
        are its values)."""
        per_row = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        rows = max(1, block_values // max(1, per_row * row_unit)) * row_unit
        return self.produce(rows)


_workspaces = threading.local()


def workspace(dtype: torch.dtype, numel: int, name: str = "block",
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A flat per-thread buffer of at least ``numel`` values, reused block after block (fresh memory would cost a page
    fault per 4 KB written); valid until the same thread asks for the same name and dtype again."""
    key = f"{name}_{dtype}"
    buffer = getattr(_workspaces, key, None)
    if buffer is None or buffer.numel() < numel or buffer.device != torch.device(device):
        buffer = torch.empty(numel, dtype=dtype, device=device)
        setattr(_workspaces, key, buffer)
    return buffer[:numel]


def within(t: torch.Tensor, largest: float) -> bool:
    """Every value of ``t`` in [-largest, largest], NaN failing: one aminmax pass (NaN propagates through it and fails
    both comparisons), where isfinite() would first fill a bool tensor the size of ``t``."""
    if not t.numel():
        return True
    low, high = torch.aminmax(t)
    return float(low) >= -largest and float(high) <= largest


def tensor_rows(tensor: torch.Tensor) -> Callable[[int], Rows]:
    """``produce`` for a tensor already at hand (a memory-mapped view, or a small computed one)."""

    def produce(rows_per_block: int) -> Rows:
        t = tensor.reshape(-1) if tensor.dim() <= 1 else tensor
        for start in range(0, max(t.shape[0], 1), rows_per_block):
            stop = min(start + rows_per_block, t.shape[0])
            yield start, stop, t[start:stop]

    return produce


class Encoder(Protocol):
    """A writer's conversion of one tensor: fed every block in order (unless ``needs_rows`` is False), each block
    written as it comes; ``finish`` completes the tensor (checks, or a conversion that needs it whole)."""

    needs_rows: bool

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None: ...

    def finish(self) -> None: ...


class TensorWriter(Protocol):
    """A file format fed by the stream: an encoder per tensor, or None where the format has no place for it."""

    def row_unit(self, tensor: StreamTensor) -> int: ...

    def encoder(self, tensor: StreamTensor) -> Encoder | None: ...


class Passthrough:
    """The stored bytes as they are (the writer's type equals the stored one): copied by the kernel, never decoded."""

    needs_rows = False

    def __init__(self, copy: Callable[[], None]) -> None:
        self._copy = copy

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None:
        raise AssertionError("a pass-through takes no rows")

    def finish(self) -> None:
        self._copy()


def _encode_all(tensor: StreamTensor, writers: Sequence[TensorWriter], block_values: int) -> None:
    pairs = [(w, e) for w, e in ((w, w.encoder(tensor)) for w in writers) if e is not None]
    rowed = [(w, e) for w, e in pairs if e.needs_rows]
    if rowed:
        unit = math.lcm(*(w.row_unit(tensor) for w, _ in rowed))
        for start, stop, rows in tensor.rows(unit, block_values):
            for _, encoder in rowed:
                encoder.add(start, stop, rows)
    for _, encoder in pairs:
        encoder.finish()


def pump(tensors: Iterable[StreamTensor], writers: Sequence[TensorWriter], workers: int = 1,
         on_written: Callable[[StreamTensor], None] | None = None, block_values: int = BLOCK_VALUES) -> None:
    """Every tensor encoded and written by every writer, ``workers`` tensors at a time. ``on_written`` gets each tensor
    once every writer has it, in stream order (for progress)."""
    parallel = single_threaded_torch() if workers > 1 else nullcontext()
    with parallel:
        encode = functools.partial(_encode_all, writers=writers, block_values=block_values)
        for tensor, _ in ordered_map(encode, tensors, workers):
            if tensor.done is not None:
                tensor.done()
            if on_written is not None:
                on_written(tensor)


def file_tensors(files: Sequence[SafetensorsFile]) -> list[StreamTensor]:
    """Every tensor of these safetensors files, in file order, as stored: zero-copy views of the memory map, the
    stored bytes as ``raw``, and their pages released from this process once written."""
    tensors = []
    for file in files:
        for info in sorted(file.tensors.values(), key=lambda t: t.begin):
            tensors.append(StreamTensor(
                info.name, info.shape, info.torch_dtype, functools.partial(file.rows, info.name),
                raw=FileSlice(file.path, info.begin, info.nbytes), done=functools.partial(file.release, info.name)))
    return tensors
