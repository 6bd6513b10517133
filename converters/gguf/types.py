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


# The K-quant mixes' main type. llama.cpp's quantizer gives some tensors more bits (the output head, attn_v and
# ffn_down of some layers: Q6_K) and rows 256 does not divide a legacy type (Q8_0 at most) or F16.
_K_MAIN = {"q4_k_m": QT.Q4_K, "q5_k_m": QT.Q5_K, "q6_k": QT.Q6_K}
_K_MORE_BITS = ("output.weight", "token_embd.weight", "attn_v.weight", "ffn_down.weight")


def k_quant_bytes_bound(gguf_name: str, shape: tuple[int, ...], type_name: str) -> int:
    """An upper bound on the bytes llama.cpp's K-quant ``type_name`` gives one tensor of an F32 file (for the disk
    pre-flight: the file's real size is known only once llama.cpp has written it)."""
    values = 1
    for n in shape:
        values *= n
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return 4 * values  # kept F32
    if shape[-1] % 256 == 0:
        qtype = QT.Q6_K if gguf_name.endswith(_K_MORE_BITS) else _K_MAIN[type_name]
    elif shape[-1] % 32 == 0:
        qtype = QT.Q8_0
    else:
        qtype = QT.F16
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return -(-values // block_size) * type_size
