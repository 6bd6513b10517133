"""GGUF output types as data: what each name writes, its llama_ftype, and whether llama.cpp must do the quantizing."""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT, LlamaFileType as FT


@dataclass(frozen=True)
class GGUFType:
    name: str
    file_type: FT
    weight_type: QT | None  # written directly by our kernels; None: K-quant, done by llama.cpp from an F32 file
    llama_ftype: int | None = None  # llama_model_quantize's ftype for K-quants


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("f32", FT.ALL_F32, QT.F32),
    GGUFType("f16", FT.MOSTLY_F16, QT.F16),
    GGUFType("bf16", FT.MOSTLY_BF16, QT.BF16),
    GGUFType("q8_0", FT.MOSTLY_Q8_0, QT.Q8_0),
    GGUFType("q4_0", FT.MOSTLY_Q4_0, QT.Q4_0),
    GGUFType("q4_1", FT.MOSTLY_Q4_1, QT.Q4_1),
    GGUFType("q5_0", FT.MOSTLY_Q5_0, QT.Q5_0),
    GGUFType("q5_1", FT.MOSTLY_Q5_1, QT.Q5_1),
    GGUFType("q4_k_m", FT.MOSTLY_Q4_K_M, None, int(FT.MOSTLY_Q4_K_M)),
    GGUFType("q5_k_m", FT.MOSTLY_Q5_K_M, None, int(FT.MOSTLY_Q5_K_M)),
    GGUFType("q6_k", FT.MOSTLY_Q6_K, None, int(FT.MOSTLY_Q6_K)),
)}


def tensor_type(gguf_name: str, shape: tuple[int, ...], weight_type: QT) -> QT:
    """llama.cpp's converter rules: 1-D tensors, norms and non-weights stay F32; a row length the block size does not
    divide falls back to F16."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return QT.F32
    block_size, _ = GGML_QUANT_SIZES[weight_type]
    if shape[-1] % block_size:
        return QT.F16
    return weight_type


def byte_shape(shape: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block_size * type_size) if shape else (type_size,)
