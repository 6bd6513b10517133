"""Facts of the safetensors format, as data."""

from __future__ import annotations

import torch

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
DTYPE_NAMES: dict[torch.dtype, str] = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's map of tensor name -> shard file
SINGLE_NAME = "model.safetensors"  # an unsharded checkpoint's one file

HEADER_LENGTH_BYTES = 8  # little-endian u64 before the JSON header
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
HEADER_ALIGNMENT = 8  # the JSON header is padded with spaces so tensor data starts 8-byte aligned


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def element_size(dtype_str: str) -> int:
    return DTYPES[dtype_str][1]
