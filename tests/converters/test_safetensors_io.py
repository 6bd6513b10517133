"""Our safetensors reader and sharded writer against the safetensors library (the oracle)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.safetensors_in import SafetensorsError, SafetensorsFile
from converters.safetensors_out import FileSlice, ShardedWriter, TensorSpec

# Warnings are errors: a writer that makes torch or numpy warn (an out= buffer resized, a cast that overflows, a file
# left open) is doing something it did not mean to. No third-party warning needed ignoring here.
pytestmark = pytest.mark.filterwarnings("error")

TENSORS = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7), "c": torch.randn(64, 16),
           "d": torch.ones(2, 2, dtype=torch.float16), "scalar": torch.tensor(3.5)}


@pytest.mark.parametrize("use_kernel_copy", [True, False])
def test_round_trip_through_library(tmp_path, monkeypatch, use_kernel_copy):
    save_file(TENSORS, tmp_path / "src.safetensors")
    src = SafetensorsFile(tmp_path / "src.safetensors")
    for name, t in TENSORS.items():
        assert torch.equal(src.tensor(name), t)
    if not use_kernel_copy:
        monkeypatch.delattr(os, "copy_file_range")
    specs = [TensorSpec(n, src.info(n).dtype, src.info(n).shape) for n in src.keys()]
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, specs, max_shard_bytes=300)
    for i, spec in enumerate(reversed(specs)):  # any order; alternate the payload kinds
        info = src.info(spec.name)
        writer.write(spec.name, FileSlice(src.path, info.begin, info.nbytes) if i % 2 else src.raw(spec.name))
    writer.close()
    src.close()  # a file left open is a ResourceWarning, an error here
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    loaded = {}
    for shard in set(weight_map.values()):
        loaded.update(load_file(out / shard))
    assert set(loaded) == set(TENSORS) and all(torch.equal(loaded[n], TENSORS[n]) for n in TENSORS)


def test_a_tensor_written_in_blocks_at_offsets(tmp_path):
    t = torch.arange(64 * 16, dtype=torch.float32).reshape(64, 16)
    writer = ShardedWriter(tmp_path, [TensorSpec("t", "F32", (64, 16))], 10**9)
    row_bytes = 16 * 4
    for start in (48, 0, 16, 32):  # blocks of 16 rows, out of order
        writer.write_at("t", t[start:start + 16].numpy().tobytes(), start * row_bytes)
    writer.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], t)


def test_writer_refuses_unknown_wrong_sized_repeated_and_missing_tensors(tmp_path):
    specs = [TensorSpec("x", "F32", (2,)), TensorSpec("y", "F32", (1,))]
    writer = ShardedWriter(tmp_path, specs, 10**9)
    with pytest.raises(ValueError, match="'z' was not planned"):
        writer.write("z", b"\0" * 4)
    with pytest.raises(ValueError, match="outside its 8"):
        writer.write("x", b"\0" * 12)
    writer.write("y", b"\0" * 4)
    with pytest.raises(ValueError, match="8 bytes written, planned 4"):
        writer.write("y", b"\0" * 4)
    writer.write_at("x", b"\0" * 4)
    with pytest.raises(ValueError, match="never written completely, first 'x'"):
        writer.close()


def test_truncated_file_is_named(tmp_path):
    save_file(TENSORS, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match="truncated"):
        SafetensorsFile(tmp_path / "t.safetensors")


@pytest.mark.parametrize("shape, row_unit, expected", [
    ((3_000_000,), 1, [(0, 1 << 20), (1 << 20, 2 << 20), (2 << 20, 3_000_000)]),  # a long 1-D tensor: ~1M at a time
    ((1000,), 1, [(0, 1000)]),  # a small one: one block
    ((4096, 512), 32, [(0, 2048), (2048, 4096)]),  # 2048 rows of 512 = 1M values, a multiple of 32 rows
    ((10, 300_000), 4, [(0, 4), (4, 8), (8, 10)]),  # rows wider than a block: row_unit rows at a time
])
def test_stream_tensor_blocks(shape, row_unit, expected):
    from converters.tensor_stream import StreamTensor, tensor_rows

    tensor = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)
    stream = StreamTensor("t", shape, torch.float32, tensor_rows(tensor))
    blocks = list(stream.rows(row_unit))
    assert [(start, stop) for start, stop, _ in blocks] == expected
    assert torch.equal(torch.cat([rows for _, _, rows in blocks]), tensor.reshape(-1) if len(shape) == 1 else tensor)
