"""A stream of Hugging Face tensors → one GGUF file for llama.cpp. The whole layout (names, shapes, types) is
planned from the tensor list before any data exists, so the header is written first and the tensors follow one at a
time, each converted from the row blocks it arrives in (memory stays at a few tensors). The file is written beside
the target and renamed into place when complete.

Knows formats only: a config (dict), a vocabulary (vocab.py) and tensors; ``write_gguf`` does the same for a folder.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as QT, GGUFValueType as VT

from converters.errors import ConverterError
from converters.gguf.arch import ArrayOf, ValueType, arch_for, gguf_tensor_name, hyperparameters, llama3_rope_factors, \
    metadata_keys, rope_heads, transform
from converters.gguf.bulk_writer import BulkArrayGGUFWriter
from converters.gguf.quants import encode_rows
from converters.gguf.types import GGUF_TYPES, GGUFType, byte_shape, tensor_type
from converters.gguf.vocab import Vocab, load_vocab
from converters.ordered_pool import default_workers
from converters.safetensors_in import SafetensorsFile, shard_names
from converters.safetensors_out import pwrite_all
from converters.tensor_stream import BLOCK_VALUES, StreamTensor, file_tensors, pump, within, workspace

F16_MAX = 65504.0


class GGUFExportError(ConverterError):
    """The model cannot be written as the GGUF asked for."""


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
    hf_name: str  # "" for tensors computed here (llama 3's rope factors)
    shape: tuple[int, ...]
    qtype: QT

    @property
    def nbytes(self) -> int:
        return math.prod(byte_shape(self.shape, self.qtype))


class GGUFPlan:
    """Every tensor's llama.cpp name, shape and type, decided from the config and the tensor list alone. Raises
    ArchError / GGUFExportError for anything llama.cpp would not run correctly, before a byte is written."""

    def __init__(self, config: dict[str, Any], tensors: Sequence[tuple[str, tuple[int, ...]]], type_name: str) -> None:
        if type_name not in GGUF_TYPES:
            raise GGUFExportError(f"GGUF type '{type_name}' is unknown; choose one of {', '.join(GGUF_TYPES)}")
        self.type_name = type_name
        self.gguf_type = GGUF_TYPES[type_name]
        # K-quants are llama.cpp's own: the tensors are written in F32 and llama.cpp quantizes that file.
        self.written_type = self.gguf_type if self.gguf_type.weight_type is not None else GGUF_TYPES["f32"]
        self.spec = arch_for(config)
        self.hp = hyperparameters(config)
        self.keys = metadata_keys(self.spec, self.hp)  # raises unless llama.cpp has every hyperparameter it needs
        names = {name for name, _ in tensors}
        if not self.spec.has_output and "lm_head.weight" in names and not self.hp.get("tie_word_embeddings", True):
            raise GGUFExportError(f"llama.cpp's {self.spec.name} always uses the token embedding as the output head, "
                                  "but this model's lm_head differs from it (an adapter changed one of them); the GGUF "
                                  "would drop that change")
        self.order: list[_PlannedTensor] = []
        for name, shape in tensors:
            gguf_name = gguf_tensor_name(self.spec, self.hp, name)
            if gguf_name is not None:
                self.order.append(_PlannedTensor(gguf_name, name, tuple(shape),
                                                 tensor_type(gguf_name, shape, self.written_type.weight_type)))
        self.rope_factors = llama3_rope_factors(self.hp)
        if self.rope_factors is not None:
            self.order.append(_PlannedTensor("rope_freqs.weight", "", tuple(self.rope_factors.shape), QT.F32))
        self.by_hf_name = {t.hf_name: t for t in self.order if t.hf_name}
        self.embed_rows = next((t.shape[0] for t in self.order if t.gguf_name == "token_embd.weight"), None)
        if self.embed_rows is None:
            raise GGUFExportError("the model has no token embedding (model.embed_tokens.weight)")

    def row_unit(self, hf_name: str) -> int:
        """Leading rows a block must keep together: one head's rows for the rotary permutation of Q and K."""
        entry = self.by_hf_name.get(hf_name)
        heads = rope_heads(self.spec, self.hp, hf_name) if entry is not None else None
        return entry.shape[0] // heads if heads and len(entry.shape) >= 2 else 1


class _DataSection:
    """The data section's layout, each tensor on the alignment boundary the tensor infos' offsets say, and the check
    that every planned tensor is written exactly once, completely. Tensors arrive in any order, from any thread."""

    def __init__(self, fd: int, start: int, alignment: int, plan: list[_PlannedTensor], result: GGUFResult) -> None:
        self.fd, self.result = fd, result
        self.place: dict[int, int] = {}  # id(entry) -> absolute offset of its data
        offset = 0
        for entry in plan:
            self.place[id(entry)] = start + offset
            offset += gguf.GGUFWriter.ggml_pad(entry.nbytes, alignment)  # as GGUFWriter laid out the tensor infos
        self.end = start + offset
        self.plan = plan
        self.written: dict[int, int] = {}
        self._lock = threading.Lock()

    def write(self, entry: _PlannedTensor, data: np.ndarray | memoryview, offset: int = 0) -> None:
        view = memoryview(data).cast("B")
        if id(entry) not in self.place:
            raise AssertionError(f"{entry.gguf_name} is not in the plan")
        if offset + len(view) > entry.nbytes:
            raise AssertionError(f"{entry.gguf_name}: bytes {offset}..{offset + len(view)} are outside its "
                                 f"{entry.nbytes}")
        with self._lock:
            self.written[id(entry)] = self.written.get(id(entry), 0) + len(view)
            if self.written[id(entry)] > entry.nbytes:
                raise AssertionError(f"{entry.gguf_name}: {self.written[id(entry)]} bytes written, planned "
                                     f"{entry.nbytes}")
        pwrite_all(self.fd, view, self.place[id(entry)] + offset)

    def finish(self) -> None:
        unfinished = [e for e in self.plan if self.written.get(id(e), 0) != e.nbytes]
        if unfinished:
            raise AssertionError(f"{len(unfinished)} planned tensors were never written completely, "
                                 f"{unfinished[0].gguf_name} first")
        os.ftruncate(self.fd, self.end)  # the last tensor's padding
        for entry in self.plan:
            self.result.tensor_types[entry.gguf_name] = entry.qtype.name


class _TensorEncoder:
    """One tensor's GGML bytes, block by block (transformed as llama.cpp expects), each written at its place."""

    needs_rows = True

    def __init__(self, plan: GGUFPlan, section: _DataSection, entry: _PlannedTensor, check_range: bool) -> None:
        self.plan, self.section, self.entry = plan, section, entry
        self.total_rows = entry.shape[0] if entry.shape else 1
        self.row_bytes = entry.nbytes // self.total_rows
        # F16 is the one type a plain cast can overflow (±65504 becomes Inf); the block types store a scale of the
        # block's maximum / 127 (or / 8) in F16 and hold values a hundred times larger.
        self.check_range = check_range and entry.qtype == QT.F16

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None:
        if self.check_range and rows.is_floating_point():
            if not within(rows, F16_MAX):
                raise GGUFExportError(f"tensor {self.entry.hf_name} has values beyond ±{F16_MAX:g}, which F16 stores as "
                                 "Inf; write gguf:bf16 or gguf:f32 instead")
        rows = transform(self.plan.spec, self.plan.hp, self.entry.hf_name, rows, total_rows=self.total_rows)
        # Float types are cast into the reused buffer; quantized blocks (and rows already in the file's type) come
        # back as their own tensor and are written from there, without a copy into the buffer.
        data = encode_rows(rows, self.entry.qtype, out=workspace(torch.uint8, (stop - start) * self.row_bytes, "gguf"))
        self.section.write(self.entry, data.cpu().numpy(), start * self.row_bytes)

    def finish(self) -> None:
        """Completeness is checked for every tensor at once when the file closes."""


def _add_key(writer: gguf.GGUFWriter, key: str, kind: ValueType, value: Any) -> None:
    if kind == VT.UINT32:
        writer.add_uint32(key, int(value))
    elif kind == VT.FLOAT32:
        writer.add_float32(key, float(value))
    elif kind == VT.STRING:
        writer.add_string(key, str(value))
    elif kind == VT.BOOL:
        writer.add_bool(key, bool(value))
    elif kind == ArrayOf(VT.BOOL):
        writer.add_array(key, [bool(v) for v in value])  # gguf-py takes the item type from the (bool) items
    else:
        raise AssertionError(f"no writer for metadata type {kind}")


def require_llama_cpp(type_name: str) -> None:
    try:
        importlib.import_module("llama_cpp")  # only whether it imports (pyflakes ignores noqa on a bare import)
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


class GGUFStreamWriter:
    """One GGUF file written from a tensor stream (a TensorWriter, see converters/tensor_stream.py): the header now,
    each planned tensor as it arrives, the file renamed into place by ``close``."""

    def __init__(self, target: Path, plan: GGUFPlan, vocab: Vocab, *, name: str,
                 metadata: dict[str, str] | None = None, check_range: bool = True) -> None:
        """``name``: general.name, what llama.cpp and Ollama show. ``check_range``: refuse values an F16 file would
        store as Inf (a ValueError naming the tensor)."""
        self.target, self.plan, self.check_range = Path(target), plan, check_range
        kquant = plan.gguf_type is not plan.written_type
        self.partial = self.target.with_name(f".{self.target.name}.{'f32' if kquant else 'partial'}-{os.getpid()}")
        vocab.pad_to(plan.embed_rows)
        self.notes = list(vocab.notes)
        self._writer = BulkArrayGGUFWriter(self.partial, plan.spec.name)
        try:
            self._write_header(vocab, metadata or {}, name)
        except BaseException:
            self.abort()
            raise
        self.result = GGUFResult(self.target, plan.spec.name, plan.type_name)
        handle = self._writer.fout[0]
        handle.flush()  # the header is in the file; tensors are written at their offsets from here on
        alignment = self._writer.data_alignment
        start = gguf.GGUFWriter.ggml_pad(handle.tell(), alignment)
        self._section = _DataSection(handle.fileno(), start, alignment, plan.order, self.result)

    def _write_header(self, vocab: Vocab, metadata: dict[str, str], name: str) -> None:
        writer, plan = self._writer, self.plan
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(int(plan.written_type.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in metadata.items():
            writer.add_string(key, value)
        for key, kind, value in plan.keys:
            _add_key(writer, f"{plan.spec.name}.{key}", kind, value)
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
        for entry in plan.order:
            shape_b = byte_shape(entry.shape, entry.qtype)
            writer.add_tensor_info(entry.gguf_name, shape_b, np.dtype(np.uint8), entry.nbytes, raw_dtype=entry.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

    # -- TensorWriter ---------------------------------------------------------------------------------------------
    def row_unit(self, tensor: StreamTensor) -> int:
        return self.plan.row_unit(tensor.name)

    def encoder(self, tensor: StreamTensor) -> _TensorEncoder | None:
        entry = self.plan.by_hf_name.get(tensor.name)
        return None if entry is None else _TensorEncoder(self.plan, self._section, entry, self.check_range)

    # -------------------------------------------------------------------------------------------------------------
    def close(self) -> GGUFResult:
        try:
            if self.plan.rope_factors is not None:
                self._section.write(self.plan.order[-1], self.plan.rope_factors.numpy().view(np.uint8))
            self._section.finish()
            self._writer.close()
            if self.plan.gguf_type is self.plan.written_type:
                self.partial.rename(self.target)
            else:
                partial = self.target.with_name(f".{self.target.name}.partial-{os.getpid()}")
                try:
                    _llama_cpp_quantize(self.partial, partial, self.plan.gguf_type, threads=os.cpu_count() or 1)
                    partial.rename(self.target)
                finally:
                    partial.unlink(missing_ok=True)
                self.result.tensor_types = {}  # llama.cpp chose them
        finally:
            self.abort()
        self.result.notes.extend(self.notes)
        return self.result

    def abort(self) -> None:
        """Remove whatever is unfinished (idempotent; after close, only temporary files remain to remove)."""
        self._writer.close()
        self.partial.unlink(missing_ok=True)


def _shards(folder: Path) -> list[SafetensorsFile]:
    return [SafetensorsFile(folder / n) for n in shard_names(folder)]


def write_gguf(folder: Path, target: Path, type_name: str = "f16", *, metadata: dict[str, str] | None = None,
               pre_tokenizer: str | None = None, block_values: int = BLOCK_VALUES,
               workers: int | None = None) -> GGUFResult:
    """Convert the HF model in ``folder`` (config.json, *.safetensors, tokenizer) to ``target``, streaming tensor by
    tensor. ``metadata`` adds string keys (provenance)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    shards = _shards(Path(folder))
    try:
        tensors = file_tensors(shards)
        plan = GGUFPlan(config, [(t.name, t.shape) for t in tensors], type_name)
        vocab = load_vocab(Path(folder), pre_tokenizer)
        writer = GGUFStreamWriter(target, plan, vocab, metadata=metadata, name=str(config.get("_name_or_path")
                                                                                 or Path(folder).name))
        try:
            pump(tensors, [writer], workers or default_workers(), block_values=block_values)
        except BaseException:
            writer.abort()
            raise
        return writer.close()
    finally:
        for shard in shards:
            shard.close()
