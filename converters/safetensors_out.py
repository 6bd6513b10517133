"""Sharded safetensors writer with a transformers-compatible index.

The layout is planned up front from (name, dtype, shape), so every shard's header is written first and every tensor's
place in its file is known: tensors are then written at their offsets (positional writes), by any thread, in any
order, a block of rows at a time or copied by the kernel from another file. Memory stays at the blocks in flight
whatever the model size. Writes go into the folder given; making the whole output appear atomically is the caller's
job (write to a temporary folder, then rename).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from converters.safetensors_format import HEADER_ALIGNMENT, INDEX_NAME, SINGLE_NAME, element_size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


@dataclass(frozen=True)
class FileSlice:
    """Bytes to copy from another file as they are: the kernel copies them (copy_file_range), no user-space pass."""

    path: Path
    offset: int
    length: int


Payload = Union[bytes, memoryview, FileSlice]


def pwrite_all(fd: int, data: bytes | memoryview, at: int) -> int:
    """``data`` written at offset ``at`` of ``fd``, continuing after short writes (a signal, a network file system);
    returns the offset after it."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
    return at


def copy_file_slice(source: FileSlice, dest_fd: int, dest_offset: int) -> None:
    """The slice's bytes written at ``dest_offset`` of ``dest_fd``, by the kernel (copy_file_range) where it can."""
    with open(source.path, "rb") as src:
        offset, remaining, at = source.offset, source.length, dest_offset
        try:
            while remaining:
                n = os.copy_file_range(src.fileno(), dest_fd, remaining, offset, at)
                if n == 0:
                    raise EOFError
                offset, at, remaining = offset + n, at + n, remaining - n
        except EOFError:
            raise OSError(f"{source.path} ended before byte {source.offset + source.length}") from None
        except (AttributeError, OSError):  # no copy_file_range (not Linux, cross-device on old kernels)
            while remaining:
                chunk = os.pread(src.fileno(), min(remaining, 64 * 2**20), offset)
                if not chunk:
                    raise OSError(f"{source.path} ended before byte {source.offset + source.length}") from None
                at = pwrite_all(dest_fd, chunk, at)
                offset, remaining = offset + len(chunk), remaining - len(chunk)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(len(encoded) + 8) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedWriter:
    """Every planned tensor written once, completely, at its place; anything else is refused."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate tensor names: {dupes[:5]}")
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(specs, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self._files = []
        self._place: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset of its data, its size)
        self._file_sizes: list[int] = []
        try:
            for shard, file_name in zip(self.shards, self.file_names):
                handle = open(self.folder / file_name, "wb")  # noqa: SIM115 - closed in close() or abort()
                self._files.append(handle)
                header = _header(shard, self.metadata)
                handle.write(header)
                handle.flush()
                offset = len(header)
                for spec in shard:
                    self._place[spec.name] = (handle.fileno(), offset, spec.nbytes)
                    offset += spec.nbytes
                self._file_sizes.append(offset)
        except BaseException:
            self.abort()
            raise
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()

    def _claim(self, name: str, offset: int, size: int) -> tuple[int, int]:
        if name not in self._place:
            raise ValueError(f"tensor {name!r} was not planned")
        fd, base, nbytes = self._place[name]
        if offset < 0 or offset + size > nbytes:
            raise ValueError(f"tensor {name!r}: bytes {offset}..{offset + size} are outside its {nbytes}")
        with self._lock:
            self._written[name] = self._written.get(name, 0) + size
            if self._written[name] > nbytes:
                raise ValueError(f"tensor {name!r}: {self._written[name]} bytes written, planned {nbytes}")
        return fd, base + offset

    def write_at(self, name: str, data: bytes | memoryview, offset: int = 0) -> None:
        """Bytes of a tensor, ``offset`` bytes into it (a block of its rows)."""
        view = memoryview(data).cast("B")
        fd, at = self._claim(name, offset, len(view))
        pwrite_all(fd, view, at)

    def copy_from(self, name: str, source: FileSlice) -> None:
        """A whole tensor copied from another file as it is."""
        fd, at = self._claim(name, 0, source.length)
        copy_file_slice(source, fd, at)

    def write(self, name: str, data: Payload) -> None:
        """A whole tensor."""
        if isinstance(data, FileSlice):
            self.copy_from(name, data)
        else:
            self.write_at(name, data)

    def close(self) -> list[Path]:
        """Check that every planned tensor is complete, finish the files and write the index (when sharded)."""
        for handle in self._files:
            handle.close()
        self._files = []
        incomplete = [name for name, (_, _, nbytes) in self._place.items() if self._written.get(name, 0) != nbytes]
        if incomplete:
            raise ValueError(f"{len(incomplete)} planned tensors were never written completely, first {incomplete[0]!r}")
        files = [self.folder / n for n in self.file_names]
        for path, size in zip(files, self._file_sizes):
            if path.stat().st_size != size:
                raise ValueError(f"{path.name} is {path.stat().st_size} bytes, planned {size}")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for shard in self.shards for s in shard)},
                "weight_map": {s.name: self.file_names[i] for i, shard in enumerate(self.shards) for s in shard},
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            files.append(self.folder / INDEX_NAME)
        return files

    def abort(self) -> None:
        """Close the files without checks (a failed run: its folder is removed by whoever made it)."""
        for handle in self._files:
            try:
                handle.close()
            except OSError:  # a full disk fails the flush; the descriptor is released all the same
                pass
        self._files = []
