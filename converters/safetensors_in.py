"""A lazy, memory-mapped safetensors reader that hands out tensors or their raw bytes without copying.

safetensors' own ``safe_open`` copies each tensor; streaming a model larger than memory wants zero-copy views and raw
bytes (untouched tensors are copied byte for byte), hence this small reader of the (simple) format.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from converters.errors import ConverterError
from converters.safetensors_format import DTYPES, HEADER_LENGTH_BYTES, INDEX_NAME, MAX_HEADER_BYTES, SINGLE_NAME


class SafetensorsError(ConverterError):
    """The file is not a valid safetensors file (truncated, bad header, overlapping data)."""


class ShardIndexError(ConverterError):
    """A checkpoint folder whose weight files cannot be told: ``what`` (the index or the folder) and ``problem`` say
    why, ``fix`` how to mend it."""

    def __init__(self, what: str, problem: str, fix: str) -> None:
        self.what, self.problem, self.fix = what, problem, fix
        super().__init__(f"{what}: {problem}")


def weight_map(folder: Path) -> dict[str, str] | None:
    """A sharded checkpoint's index (model.safetensors.index.json): tensor name -> shard file, checked to name plain
    files of the folder; None when the folder has no index. The one place the index is read; ShardIndexError."""
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        return None
    fix = "restore the index file that came with the shards."
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ShardIndexError(str(index_path), f"is not UTF-8 text ({e.reason} at byte {e.start}).", fix) from e
    except json.JSONDecodeError as e:
        raise ShardIndexError(str(index_path), f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).",
                              fix) from e
    except RecursionError as e:
        raise ShardIndexError(str(index_path), "nests JSON too deeply to be a configuration file.", fix) from e
    if not isinstance(index, dict):
        raise ShardIndexError(str(index_path), f"holds a JSON {type(index).__name__}, not an object.", fix)
    mapping = index.get("weight_map")
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ShardIndexError(f"{index_path} (weight_map)", "is not an object of tensor name -> shard file name.", fix)
    for name in set(mapping.values()):
        if Path(name).name != name:  # "../x" or "/etc/x" would read outside the folder
            raise ShardIndexError(f"{index_path} (weight_map)", f"names {name!r}, which is not a file in the folder.",
                                  fix)
    return mapping


def shard_names(folder: Path) -> list[str]:
    """The weight files of a Hugging Face checkpoint folder, sorted: those its shard index names, else the one
    model.safetensors. ShardIndexError when neither can be found."""
    mapping = weight_map(folder)
    if mapping is not None:
        return sorted(set(mapping.values()))
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if shards:
        raise ShardIndexError(str(folder), f"has shards ({shards[0]}, …) but no {INDEX_NAME}.",
                              "restore the index file that came with the shards.")
    bins = sorted(p.name for p in folder.glob("*.bin"))
    raise ShardIndexError(str(folder), "holds no *.safetensors weights" + (f" (only {bins[0]}, a pickle)" if bins
                                                                            else "") + ".",
                          "re-save the base with save_pretrained(safe_serialization=True).")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the data
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    """One header entry, every field checked: its type, then its value against the file."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise SafetensorsError(f"header entry for {name!r} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SafetensorsError(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise SafetensorsError(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise SafetensorsError(f"tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
    if data_start + end > size:
        raise SafetensorsError(f"tensor {name!r} ends at byte {data_start + end} but the file has {size} "
                               "(truncated?)")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate the header: (tensors in file order, __metadata__, data start offset)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(HEADER_LENGTH_BYTES)
        if len(raw_len) < HEADER_LENGTH_BYTES:
            raise SafetensorsError(f"file is {size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_len > size:
            raise SafetensorsError(f"header length {header_len} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise SafetensorsError(f"header is not JSON ({type(e).__name__})") from e
    data_start = HEADER_LENGTH_BYTES + header_len
    if not isinstance(header, dict):
        raise SafetensorsError(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError("header __metadata__ is not an object of strings")
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        infos.append(_entry(name, entry, data_start, size))
    infos.sort(key=lambda t: t.begin)
    for prev, cur in zip(infos, infos[1:]):
        if cur.begin < prev.end:
            raise SafetensorsError(f"tensors {prev.name!r} and {cur.name!r} overlap")
    return {t.name: t for t in infos}, metadata, data_start


class SafetensorsFile:
    """One safetensors file, memory-mapped copy-on-write (writable views for torch, nothing written back)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)
        size = os.path.getsize(self.path)
        # The map holds its own duplicate of the descriptor: the file is closed at once, so a run leaks no open file
        # (a ResourceWarning, one descriptor per input file) however long the caller keeps the object.
        with open(self.path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def raw(self, name: str) -> memoryview:
        info = self.tensors[name]
        return memoryview(self._map)[info.begin:info.end]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor; call .clone() to keep it past close()."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(self._map, dtype=info.torch_dtype, count=info.nbytes // DTYPES[info.dtype][1],
                                offset=info.begin).reshape(info.shape)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop the tensor's pages (or those of its bytes [begin, end)) from this process; they stay in the page
        cache, and a later read maps them again. Streaming a model through the map would otherwise leave every page
        touched counted in the process's resident memory."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[name]
        first = info.begin + begin
        last = info.end if end is None else min(info.end, info.begin + end)
        first -= first % mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def rows(self, name: str, rows_per_block: int):
        """(start, stop, rows) blocks of the tensor as zero-copy views, each block's pages released once the next
        is asked for (a 262k-token embedding is never resident whole)."""
        tensor = self.tensor(name)
        flat = tensor.reshape(-1) if tensor.dim() <= 1 else tensor
        n_rows = max(flat.shape[0], 1)
        row_bytes = self.tensors[name].nbytes // n_rows
        for start in range(0, n_rows, rows_per_block):
            stop = min(start + rows_per_block, n_rows)
            yield start, stop, flat[start:stop]
            self.release(name, start * row_bytes, stop * row_bytes)

    def close(self) -> None:
        # Nothing open to close (see __init__). Views handed out keep the map alive; mmap.close would fail with
        # exported buffers, so GC unmaps it.
        pass
