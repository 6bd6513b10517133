"""HF safetensors folder → GGUF file. Streams tensor by tensor (memory stays at one tensor), writes to a temporary
file beside the target and renames it into place when complete.

Knows formats only: it takes a folder (config.json, *.safetensors, tokenizer) and writes a file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as QT

from converters.ordered_pool import default_workers, ordered_map, single_threaded_torch
from converters.gguf.arch import BOOL, BOOLS, F32, STR, U32, ArchSpec, arch_for, gguf_tensor_name, \
    hyperparameters, llama3_rope_factors, metadata_keys, rope_heads, transform
from converters.gguf.bulk_writer import BulkArrayGGUFWriter
from converters.gguf.quants import FLOAT_TYPES, encode_rows
from converters.gguf.types import GGUF_TYPES, GGUFType, byte_shape, tensor_type
from converters.gguf.vocab import load_vocab
from converters.safetensors_in import SafetensorsFile


# Half a million values per chunk: each chunk's buffers stay in cache between encoding and writing, and the per-chunk
# overhead (~60 us of Python and a write call) is small against the work. Measured on 1.2 GB bf16 -> F16 (2 cores):
# 0.7-0.8 s at 2^18 and 2^19 values, 0.94 s at 2^20 (cache misses), 1.35 s at 2^16 (overhead).
CHUNK_VALUES = 1 << 19


class GGUFExportError(ValueError):
    """The folder cannot be written as the GGUF asked for."""


@dataclass
class GGUFResult:
    path: Path
    arch: str
    type_name: str
    tensor_types: dict[str, str] = field(default_factory=dict)  # gguf name -> ggml type written
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _PlannedTensor:
    gguf_name: str
    hf_name: str
    shard: SafetensorsFile | None  # None: computed here (llama 3's rope factors)
    shape: tuple[int, ...]
    qtype: QT

    @property
    def nbytes(self) -> int:
        return math.prod(byte_shape(self.shape, self.qtype))


@dataclass(frozen=True)
class _Chunk:
    """Rows [start, stop) of a tensor's leading dimension: the unit converted in parallel and written in order."""
    tensor: _PlannedTensor
    start: int
    stop: int
    last: bool  # the tensor's final chunk: its source pages can be released once written


def _chunks(entry: _PlannedTensor, row_unit: int, chunk_values: int) -> list[_Chunk]:
    """Blocks of about ``chunk_values`` values, in whole multiples of ``row_unit`` leading rows (a head, for
    permuted tensors). 1-D tensors are one chunk."""
    if len(entry.shape) < 2:
        return [_Chunk(entry, 0, entry.shape[0] if entry.shape else 1, True)]
    rows, values_per_row = entry.shape[0], math.prod(entry.shape[1:])
    step = max(1, chunk_values // (values_per_row * row_unit)) * row_unit
    starts = range(0, rows, step)
    return [_Chunk(entry, start, min(start + step, rows), start + step >= rows) for start in starts]


def _row_unit(spec: ArchSpec, hp: dict, entry: _PlannedTensor) -> int:
    """Leading rows a chunk must keep together: one head's rows for the rotary permutation of Q and K."""
    heads = rope_heads(spec, hp, entry.hf_name) if entry.shard is not None else None
    return entry.shape[0] // heads if heads and len(entry.shape) >= 2 else 1


class _DataSection:
    """Writes the data section chunk by chunk, in order. Done here rather than through GGUFWriter.write_tensor_data,
    which takes whole tensors; each tensor starts on the alignment boundary, as the tensor infos' offsets say. Refuses
    tensors out of the planned order and tensors of the wrong size, and a section left unfinished."""

    def __init__(self, out: BinaryIO, alignment: int, plan: list[_PlannedTensor], result: GGUFResult,
                 on_bytes: Callable[[int], None] | None) -> None:
        self.out, self.alignment, self.result, self.on_bytes = out, alignment, result, on_bytes
        self.pending = list(reversed(plan))  # the next tensor to write is last
        self.tensor_bytes = 0

    def write(self, chunk: _Chunk, data: np.ndarray) -> None:
        entry = chunk.tensor
        if chunk.start == 0:
            if not self.pending or self.pending.pop() is not entry:
                raise AssertionError(f"{entry.gguf_name} is out of the order its tensor info was written in")
            self._pad()
            self.tensor_bytes = 0
        self.out.write(memoryview(data))
        self.tensor_bytes += data.nbytes
        if self.on_bytes is not None:
            self.on_bytes(data.nbytes)
        if chunk.last:
            if self.tensor_bytes != entry.nbytes:
                raise AssertionError(f"{entry.gguf_name}: wrote {self.tensor_bytes} bytes, planned {entry.nbytes}")
            self.result.tensor_types[entry.gguf_name] = entry.qtype.name
            if entry.shard is not None:
                entry.shard.release(entry.hf_name)  # its pages stay in the page cache, not in this process

    def finish(self) -> None:
        if self.pending:
            raise AssertionError(f"{len(self.pending)} planned tensors were never written, {self.pending[-1].gguf_name} "
                                 "first")
        self._pad()

    def _pad(self) -> None:
        self.out.write(bytes(-self.out.tell() % self.alignment))


def _shards(folder: Path) -> list[SafetensorsFile]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    return [SafetensorsFile(folder / n) for n in names]


def _add_key(writer: gguf.GGUFWriter, key: str, kind: str, value: object) -> None:
    if kind == U32:
        writer.add_uint32(key, int(value))
    elif kind == F32:
        writer.add_float32(key, float(value))
    elif kind == STR:
        writer.add_string(key, str(value))
    elif kind == BOOL:
        writer.add_bool(key, bool(value))
    elif kind == BOOLS:
        writer.add_array(key, [bool(v) for v in value])
    else:
        raise AssertionError(kind)


def require_llama_cpp(type_name: str) -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise GGUFExportError(f"{type_name} is a K-quant, which only llama.cpp's quantizer writes, and "
                              "llama-cpp-python is not installed; install lora-export[llama] (builds llama.cpp, "
                              "7-12 minutes) or choose a direct type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1)") from e


def _llama_cpp_quantize(source: Path, target: Path, gguf_type: GGUFType, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf_type.llama_ftype
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise GGUFExportError(f"llama.cpp's quantizer failed ({status}) turning {source.name} into {gguf_type.name}")


def write_gguf(folder: Path, target: Path, type_name: str = "f16", *, metadata: dict[str, str] | None = None,
               pre_tokenizer: str | None = None, on_bytes: Callable[[int], None] | None = None,
               device: str = "cpu", chunk_values: int = CHUNK_VALUES) -> GGUFResult:
    """Convert the HF model in ``folder`` to ``target``. ``metadata`` adds string keys (provenance).

    Tensors are converted ``chunk_values`` values at a time (block quantization on all cores) and written in order,
    so memory holds a few chunks whatever the model's size."""
    if type_name not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type '{type_name}' is unknown; choose one of {', '.join(GGUF_TYPES)}")
    gguf_type = GGUF_TYPES[type_name]
    if gguf_type.weight_type is None:
        require_llama_cpp(type_name)
        intermediate = target.with_name(f".{target.name}.f32-{os.getpid()}")
        try:
            result = write_gguf(folder, intermediate, "f32", metadata=metadata, pre_tokenizer=pre_tokenizer,
                                on_bytes=on_bytes, device=device, chunk_values=chunk_values)
            partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
            _llama_cpp_quantize(intermediate, partial, gguf_type, threads=os.cpu_count() or 1)
            partial.rename(target)
        finally:
            intermediate.unlink(missing_ok=True)
        result.path, result.type_name, result.tensor_types = target, type_name, {}
        return result

    config = json.loads((folder / "config.json").read_text())
    spec = arch_for(config)
    hp = hyperparameters(config)
    vocab = load_vocab(folder, pre_tokenizer)
    shards = _shards(folder)

    # Plan: every tensor's name, shape and type, so the header can be written before any data.
    plan: list[_PlannedTensor] = []
    for shard in shards:
        for info in sorted(shard.tensors.values(), key=lambda t: t.begin):
            name = gguf_tensor_name(spec, hp, info.name)
            if name is not None:
                plan.append(_PlannedTensor(name, info.name, shard, info.shape,
                                           tensor_type(name, info.shape, gguf_type.weight_type)))
    if not spec.has_output and any(shard.tensors.get("lm_head.weight") for shard in shards) \
            and not hp.get("tie_word_embeddings", True):
        raise GGUFExportError(f"llama.cpp's {spec.name} always uses the token embedding as the output head, but this "
                              "model's lm_head differs from it (an adapter changed one of them); the GGUF would drop "
                              "that change")
    rope_factors = llama3_rope_factors(hp)
    if rope_factors is not None:
        plan.append(_PlannedTensor("rope_freqs.weight", "", None, tuple(rope_factors.shape), QT.F32))
    embed_rows = next((t.shape[0] for t in plan if t.gguf_name == "token_embd.weight"), None)
    if embed_rows is None:
        raise GGUFExportError("the model has no token embedding (model.embed_tokens.weight)")
    vocab.pad_to(embed_rows)

    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    writer = BulkArrayGGUFWriter(partial, spec.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(config.get("_name_or_path") or folder.name))
        writer.add_file_type(int(gguf_type.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        for key, kind, value in metadata_keys(spec, hp):
            _add_key(writer, f"{spec.name}.{key}", kind, value)
        writer.add_tokenizer_model(vocab.model)
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        if vocab.scores is not None:
            writer.add_token_scores(vocab.scores)
        if vocab.add_space_prefix is not None:
            writer.add_add_space_prefix(vocab.add_space_prefix)
        if vocab.remove_extra_whitespaces is not None:
            writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
        vocab.special.add_to_gguf(writer, quiet=True)

        for entry in plan:
            shape_b = byte_shape(entry.shape, entry.qtype)
            writer.add_tensor_info(entry.gguf_name, shape_b, np.dtype(np.uint8), entry.nbytes, raw_dtype=entry.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        result = GGUFResult(target, spec.name, type_name)

        chunks = [chunk for entry in plan for chunk in _chunks(entry, _row_unit(spec, hp, entry), chunk_values)]
        # Float types are casts, cheaper than the writes: one thread converting into one reused buffer, each chunk
        # written while still in cache, beat a second, writing thread (1.2 GB: 0.68 s vs 0.99 s) and fresh memory
        # per chunk (a page fault per 4 KB). Block quantization is compute-bound: one chunk per core.
        float_output = gguf_type.weight_type in FLOAT_TYPES
        workers = 1 if float_output or device != "cpu" else default_workers()
        reused = None  # only float casts write into a caller's buffer; they always run on this one thread
        if float_output:
            widest = max(math.prod(c.tensor.shape[1:]) * (c.stop - c.start) for c in chunks)
            reused = torch.empty(widest * torch.float32.itemsize, dtype=torch.uint8)

        def encode(chunk: _Chunk) -> np.ndarray:
            entry = chunk.tensor
            whole = rope_factors if entry.shard is None else entry.shard.tensor(entry.hf_name)
            rows = whole[chunk.start:chunk.stop] if whole.dim() >= 2 else whole
            rows = transform(spec, hp, entry.hf_name, rows.to(device), total_rows=len(whole) if whole.dim() else None)
            # The source dtype goes straight to the kernels, which stage it through a cached float32 buffer.
            return encode_rows(rows, entry.qtype, out=reused).cpu().numpy()

        section = _DataSection(writer.fout[0], writer.data_alignment, plan, result, on_bytes)
        with single_threaded_torch() if workers > 1 else nullcontext():
            for chunk, data in ordered_map(encode, chunks, workers):
                section.write(chunk, data)  # before the next chunk is encoded into the same buffer
        section.finish()
        writer.close()
        partial.rename(target)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    result.notes.extend(vocab.notes)
    return result
