"""HF safetensors folder → GGUF file. Streams tensor by tensor (memory stays at one tensor), writes to a temporary
file beside the target and renames it into place when complete.

Knows formats only: it takes a folder (config.json, *.safetensors, tokenizer) and writes a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as QT

from converters.ordered_pool import default_workers, ordered_map, single_threaded_torch
from converters.gguf.arch import BOOL, BOOLS, F32, STR, U32, arch_for, gguf_tensor_name, hyperparameters, \
    llama3_rope_factors, metadata_keys, transform
from converters.gguf.quants import quantize
from converters.gguf.types import GGUF_TYPES, GGUFType, byte_shape, tensor_type
from converters.gguf.vocab import load_vocab
from converters.safetensors_in import SafetensorsFile


class GGUFExportError(ValueError):
    """The folder cannot be written as the GGUF asked for."""


@dataclass
class GGUFResult:
    path: Path
    arch: str
    type_name: str
    tensor_types: dict[str, str] = field(default_factory=dict)  # gguf name -> ggml type written
    notes: list[str] = field(default_factory=list)


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
               device: str = "cpu") -> GGUFResult:
    """Convert the HF model in ``folder`` to ``target``. ``metadata`` adds string keys (provenance)."""
    if type_name not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type '{type_name}' is unknown; choose one of {', '.join(GGUF_TYPES)}")
    gguf_type = GGUF_TYPES[type_name]
    if gguf_type.weight_type is None:
        require_llama_cpp(type_name)
        intermediate = target.with_name(f".{target.name}.f32-{os.getpid()}")
        try:
            result = write_gguf(folder, intermediate, "f32", metadata=metadata, pre_tokenizer=pre_tokenizer,
                                on_bytes=on_bytes, device=device)
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
    plan: list[tuple[str, str, SafetensorsFile | None, tuple[int, ...], QT]] = []
    for shard in shards:
        for info in sorted(shard.tensors.values(), key=lambda t: t.begin):
            name = gguf_tensor_name(spec, hp, info.name)
            if name is not None:
                plan.append((name, info.name, shard, info.shape, tensor_type(name, info.shape, gguf_type.weight_type)))
    if not spec.has_output and any(shard.tensors.get("lm_head.weight") for shard in shards) \
            and not hp.get("tie_word_embeddings", True):
        raise GGUFExportError(f"llama.cpp's {spec.name} always uses the token embedding as the output head, but this "
                              "model's lm_head differs from it (an adapter changed one of them); the GGUF would drop "
                              "that change")
    rope_factors = llama3_rope_factors(hp)
    if rope_factors is not None:
        plan.append(("rope_freqs.weight", "", None, tuple(rope_factors.shape), QT.F32))
    embed_rows = next((shape[0] for name, _, _, shape, _ in plan if name == "token_embd.weight"), None)
    if embed_rows is None:
        raise GGUFExportError("the model has no token embedding (model.embed_tokens.weight)")
    vocab.pad_to(embed_rows)

    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, spec.name)
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

        for name, _, _, shape, qtype in plan:
            shape_b = byte_shape(shape, qtype)
            writer.add_tensor_info(name, shape_b, np.dtype(np.uint8), int(np.prod(shape_b)), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        result = GGUFResult(target, spec.name, type_name)

        def convert(entry: tuple) -> np.ndarray:
            _, hf_name, shard, _, qtype = entry
            # The source dtype goes straight to the kernels, which convert to float32 a chunk at a time.
            tensor = rope_factors if shard is None else transform(spec, hp, hf_name, shard.tensor(hf_name).to(device))
            return quantize(tensor, qtype)

        workers = default_workers() if device == "cpu" else 1
        with single_threaded_torch() if workers > 1 else nullcontext():
            for (name, hf_name, shard, shape, qtype), data in ordered_map(convert, plan, workers):
                writer.write_tensor_data(data)
                result.tensor_types[name] = qtype.name
                if shard is not None:
                    shard.release(hf_name)
                if on_bytes is not None:
                    on_bytes(data.nbytes)
        writer.close()
        partial.rename(target)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    result.notes.extend(vocab.notes)
    return result
