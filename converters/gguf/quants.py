"""GGML block quantizers, vectorised with torch (any device), bit-identical to llama.cpp's reference quantization.

Each kernel takes float32 blocks of shape (n_blocks, block_size) and returns their bytes, (n_blocks, type_size) uint8.
Geometry comes from gguf's own table (GGML_QUANT_SIZES); the arithmetic follows ggml-quants.c step by step in float32
(the same operations gguf-py's numpy reference performs), so results match byte for byte, rounding included.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # C's roundf (ties away from zero) written as ggml's numpy port does, to match it bit for bit.
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.uint8).reshape(x.shape[0], 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Element j in the low nibble and element j + block/2 in the high nibble of byte j."""
    half = q.shape[1] // 2
    return (q[:, :half] & 0x0F) | (q[:, half:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 elements, packed little-endian into 4 bytes (ggml's qh)."""
    bits = ((q >> 4) & 1).to(torch.int64)
    word = (bits << torch.arange(32, device=q.device)).sum(dim=1)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=1).to(torch.uint8)


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude, with its sign (the first one on ties, as ggml's loop keeps)."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    qs = _round_half_away(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), qs], dim=1)


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _signed_absmax(blocks) / -8
    q = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1)


def quantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], dim=1)


def quantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _signed_absmax(blocks) / -16
    q = torch.trunc(blocks * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _high_bits(q), _pack_nibbles(q)], dim=1)


def quantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d = (hi - lo) / 31
    q = torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _high_bits(q), _pack_nibbles(q)], dim=1)


def quantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.to(torch.float16).view(torch.uint8)


def quantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.to(torch.bfloat16).view(torch.uint8)  # round-to-nearest-even, as ggml_compute_fp32_to_bf16


def quantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.uint8)


KERNELS: dict[QT, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.F32: quantize_f32,
    QT.F16: quantize_f16,
    QT.BF16: quantize_bf16,
    QT.Q8_0: quantize_q8_0,
    QT.Q4_0: quantize_q4_0,
    QT.Q4_1: quantize_q4_1,
    QT.Q5_0: quantize_q5_0,
    QT.Q5_1: quantize_q5_1,
}


def quantize(tensor: torch.Tensor, qtype: QT, *, rows_per_chunk: int = 4096) -> np.ndarray:
    """Quantize a tensor (any float dtype) row-major into GGML blocks: a flat uint8 array. Rows are converted to
    float32 a chunk at a time, so memory stays at one chunk beyond the output. The last dimension must be a multiple
    of the block size."""
    if qtype not in KERNELS:
        raise ValueError(f"no direct kernel for {qtype.name}; direct types: {', '.join(k.name for k in KERNELS)}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if tensor.shape and tensor.shape[-1] % block_size:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block_size}, got {tuple(tensor.shape)}")
    rows = tensor.reshape(-1, tensor.shape[-1] if tensor.shape else 1)
    row_bytes = rows.shape[1] // block_size * type_size
    out = np.empty(rows.shape[0] * row_bytes, dtype=np.uint8)
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = rows[start:start + rows_per_chunk]
        packed = KERNELS[qtype](chunk.to(torch.float32).reshape(-1, block_size))
        assert packed.shape[1] == type_size, (qtype, packed.shape)
        out[start * row_bytes:(start + chunk.shape[0]) * row_bytes] = packed.cpu().numpy().reshape(-1)
    return out
