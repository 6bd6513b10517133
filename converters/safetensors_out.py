"""Sharded safetensors writer with a transformers-compatible index.

The layout is planned up front from (name, dtype, shape), so each shard's header is written before its data and the
tensors then stream in one at a time: memory stays at one tensor whatever the model size. Writes go into the folder
given; making the whole output appear atomically is the caller's job (write to a temporary folder, then rename).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

from converters.safetensors_format import HEADER_ALIGNMENT, element_size

SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


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


def _copy_slice(source: FileSlice, dest: BinaryIO) -> None:
    dest.flush()
    with open(source.path, "rb") as src:
        offset, remaining = source.offset, source.length
        try:
            while remaining:
                n = os.copy_file_range(src.fileno(), dest.fileno(), remaining, offset)
                if n == 0:
                    raise OSError(f"{source.path} ended before byte {source.offset + source.length}")
                offset += n
                remaining -= n
        except (AttributeError, OSError) as e:  # no copy_file_range (not Linux, cross-device on old kernels)
            if isinstance(e, OSError) and "ended before" in str(e):
                raise
            src.seek(offset)
            while remaining:
                chunk = src.read(min(remaining, 64 * 2**20))
                if not chunk:
                    raise OSError(f"{source.path} ended before byte {source.offset + source.length}") from None
                dest.write(chunk)
                remaining -= len(chunk)


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
        return [SINGLE_FILE_NAME]
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
    """Write tensors in the planned order. Refuses out-of-order, missing or wrongly sized tensors."""

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
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._open_index = -1
        self._handle: BinaryIO | None = None
        self.bytes_written = 0

    def _switch_to(self, shard_index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = open(self.folder / self.file_names[shard_index], "wb")
        self._handle.write(_header(self.shards[shard_index], self.metadata))
        self._open_index = shard_index

    def write(self, name: str, data: Payload) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor {name!r} was not planned (all planned tensors are written)")
        shard_index, spec = self._queue[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name!r} next, got {name!r}")
        size = data.length if isinstance(data, FileSlice) else len(memoryview(data).cast("B"))
        if size != spec.nbytes:
            raise ValueError(f"tensor {name!r}: {size} bytes, planned {spec.nbytes}")
        if shard_index != self._open_index:
            self._switch_to(shard_index)
        assert self._handle is not None
        if isinstance(data, FileSlice):
            _copy_slice(data, self._handle)
        else:
            self._handle.write(data)
        self.bytes_written += spec.nbytes
        self._next += 1

    def close(self) -> list[Path]:
        """Finish the last shard and write the index (when sharded). Returns the files written."""
        if self._next != len(self._queue):
            missing = [spec.name for _, spec in self._queue[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[0]!r}")
        if self._handle is None and self._queue == []:
            self._switch_to(0)  # an empty model still gets a valid file
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        files = [self.folder / n for n in self.file_names]
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for shard in self.shards for s in shard)},
                "weight_map": {s.name: self.file_names[i] for i, shard in enumerate(self.shards) for s in shard},
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            files.append(self.folder / INDEX_NAME)
        return files
