"""The bitsandbytes checkpoint format (as transformers' ``save_pretrained`` writes it), as data and small parsers.

No bitsandbytes import here: reading the format needs only the key names, the JSON quant state and the code tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from converters.errors import ConverterError

QUANT_METHOD = "bitsandbytes"  # config.json: quantization_config.quant_method
QUANT_TYPES = ("nf4", "fp4")

# Keys of one 4-bit Linear, after "<module>.weight": the packed codes are "<module>.weight" itself.
ABSMAX = "absmax"  # one scale per block: float32, or uint8 codes when double-quantized
QUANT_MAP = "quant_map"  # the 16-entry code table (bitsandbytes ignores it and uses its built-in table)
NESTED_ABSMAX = "nested_absmax"  # double quant: float32 scale per block of `nested_blocksize` absmax codes
NESTED_QUANT_MAP = "nested_quant_map"  # double quant: 256-entry float32 table of the absmax codes
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"  # + quant type; a uint8 tensor holding UTF-8 JSON
FOUR_BIT_TENSOR_SUFFIXES = (ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP)

# Keys of one int8 Linear, after "<module>.": "weight" (int8, row-major), "SCB" (float32 absmax per output row) and
# "weight_format" (a uint8 scalar, 0 = row-major; bitsandbytes loads nothing else).
INT8_SCALE = "SCB"
INT8_FORMAT = "weight_format"
INT8_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}  # bitsandbytes.utils mapping
INT8_ROW = 0

DEFAULT_BLOCKSIZE = 64  # Params4bit's default; transformers never changes it

# Names bitsandbytes writes for dtypes (`str(dtype).strip("torch.")`) and transformers for quant_storage.
FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORAGE_DTYPES: dict[str, torch.dtype] = {**FLOAT_DTYPES, "uint8": torch.uint8, "int8": torch.int8,
                                          "float64": torch.float64}

# The 4-bit code tables, exactly as bitsandbytes' kernels hold them (float32 after the division below).
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
             1.0)
# FP4 (sign, 2 exponent bits, 1 mantissa bit) in bit-pattern order, divided by 12 in float32. Code 8 ("negative
# zero") is +0.0 as in bitsandbytes' Python table (the quant_map it saves), its AVX-512 CPU kernel and its pure-torch
# backend; its CUDA and scalar CPU kernels give -0.0 there. Equal values either way; only the sign bit differs.
FP4_CODES_TIMES_12 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


class BnbFormatError(ConverterError):
    """A bitsandbytes checkpoint is incomplete or inconsistent. The message names the key and what is wrong."""

    def __init__(self, key: str, problem: str, fix: str | None = None) -> None:
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}" + (f" Fix: {fix}" if fix else ""))


def code_table(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 float32 values a 4-bit code stands for (before scaling by its block's absmax)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODES, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(FP4_CODES_TIMES_12, dtype=torch.float32, device=device) / 12
    raise BnbFormatError("quant_type", f"unknown 4-bit quant type {quant_type!r}; bitsandbytes has {QUANT_TYPES}")


@dataclass(frozen=True)
class BnbConfig:
    """config.json's ``quantization_config`` for bitsandbytes, reduced to what decides the stored tensors."""

    bits: int  # 4 or 8
    quant_type: str | None  # "nf4" | "fp4" for 4-bit, None for int8
    double_quant: bool  # 4-bit absmax quantized again (nested_absmax / nested_quant_map present)
    blocksize: int | None  # None: not in the config (transformers uses 64; each tensor's quant state says)
    compute_dtype: torch.dtype  # matmul dtype at inference; does not change the stored tensors
    quant_storage: torch.dtype  # dtype the packed 4-bit bytes are viewed as in the file
    skip_modules: tuple[str, ...] | None  # llm_int8_skip_modules as written (None: transformers' default skips)
    int8_threshold: float  # llm_int8_threshold (outlier decomposition at inference only)


def _flag(config: Mapping[str, Any], name: str) -> bool:
    value = config.get(name, config.get("_" + name, False))  # transformers writes both spellings
    if not isinstance(value, bool):
        raise BnbFormatError(f"quantization_config.{name}", f"must be true or false, got {value!r}")
    return value


def _dtype(config: Mapping[str, Any], name: str, default: str, table: Mapping[str, torch.dtype]) -> torch.dtype:
    value = config.get(name) or default
    if value not in table:
        raise BnbFormatError(f"quantization_config.{name}", f"unknown dtype {value!r}; expected one of {sorted(table)}")
    return table[value]


def parse_quantization_config(config: Mapping[str, Any]) -> BnbConfig:
    """Read the ``quantization_config`` dict of a bitsandbytes checkpoint's config.json."""
    method = config.get("quant_method")
    if method != QUANT_METHOD:
        raise BnbFormatError("quantization_config.quant_method", f"is {method!r}, not {QUANT_METHOD!r}")
    four, eight = _flag(config, "load_in_4bit"), _flag(config, "load_in_8bit")
    if four == eight:
        raise BnbFormatError("quantization_config", "exactly one of load_in_4bit and load_in_8bit must be true, got "
                                                    f"load_in_4bit={four}, load_in_8bit={eight}")
    quant_type = None
    if four:
        quant_type = config.get("bnb_4bit_quant_type", "fp4")  # transformers' default is fp4, not nf4
        if quant_type not in QUANT_TYPES:
            raise BnbFormatError("quantization_config.bnb_4bit_quant_type",
                                 f"unknown quant_type {quant_type!r}; bitsandbytes has {QUANT_TYPES}")
    blocksize = config.get("bnb_4bit_blocksize")
    if blocksize is not None and (not isinstance(blocksize, int) or blocksize <= 0):
        raise BnbFormatError("quantization_config.bnb_4bit_blocksize", f"must be a positive integer, got {blocksize!r}")
    skip = config.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise BnbFormatError("quantization_config.llm_int8_skip_modules", f"must be a list of names, got {skip!r}")
    return BnbConfig(
        bits=4 if four else 8,
        quant_type=quant_type,
        double_quant=four and _flag(config, "bnb_4bit_use_double_quant"),
        blocksize=blocksize,
        compute_dtype=_dtype(config, "bnb_4bit_compute_dtype", "float32", FLOAT_DTYPES),
        quant_storage=_dtype(config, "bnb_4bit_quant_storage", "uint8", STORAGE_DTYPES),
        skip_modules=None if skip is None else tuple(skip),
        int8_threshold=float(config.get("llm_int8_threshold", 6.0)),
    )


@dataclass(frozen=True)
class QuantState4bit:
    """The JSON half of a 4-bit weight's quant state (the tensors travel beside it)."""

    quant_type: str
    blocksize: int
    dtype: torch.dtype  # dtype of the weight when it was quantized; dequantization returns it
    shape: tuple[int, ...]  # logical shape (Conv1D weights: already transposed to (out, in))
    nested_blocksize: int | None = None
    nested_dtype: torch.dtype | None = None
    nested_offset: float | None = None  # mean of the absmax values, subtracted before quantizing them

    @property
    def nested(self) -> bool:
        return self.nested_blocksize is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)


def _positive_int(state: Mapping[str, Any], field: str, key: str) -> int:
    value = state.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BnbFormatError(key, f"quant state field {field!r} must be a positive integer, got {value!r}")
    return value


def parse_quant_state(data: bytes | torch.Tensor, key: str) -> QuantState4bit:
    """Parse ``<module>.weight.quant_state.bitsandbytes__<type>`` (JSON bytes, or the uint8 tensor holding them)."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise BnbFormatError(key, f"quant state must be a 1-D uint8 tensor of JSON bytes, got {data.dtype} "
                                      f"{tuple(data.shape)}")
        data = data.cpu().numpy().tobytes()
    try:
        state = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BnbFormatError(key, f"quant state is not valid JSON ({e})", "re-save the checkpoint") from None
    if not isinstance(state, dict):
        raise BnbFormatError(key, f"quant state JSON must be an object, got {type(state).__name__}")
    quant_type = state.get("quant_type")
    if quant_type not in QUANT_TYPES:
        raise BnbFormatError(key, f"unknown quant_type {quant_type!r}; bitsandbytes has {QUANT_TYPES}")
    if not key.endswith(QUANT_STATE_PREFIX + quant_type) and QUANT_STATE_PREFIX in key:
        raise BnbFormatError(key, f"quant state says quant_type {quant_type!r} but its key names another type")
    if state.get("dtype") not in FLOAT_DTYPES:
        raise BnbFormatError(key, f"quant state dtype {state.get('dtype')!r} is not one of {sorted(FLOAT_DTYPES)}")
    shape = state.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                              for d in shape):  # an empty weight is nothing transformers quantizes
        raise BnbFormatError(key, f"quant state shape must be a list of positive sizes, got {shape!r}")
    nested_fields = ("nested_blocksize", "nested_dtype", "nested_offset")
    present = [f for f in nested_fields if f in state]
    if present and len(present) != len(nested_fields):
        raise BnbFormatError(key, f"quant state has {present} but not all of {list(nested_fields)}")
    nested: dict[str, Any] = {}
    if present:
        if state["nested_dtype"] not in FLOAT_DTYPES:
            raise BnbFormatError(key, f"quant state nested_dtype {state['nested_dtype']!r} is not a float dtype")
        offset = state["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise BnbFormatError(key, f"quant state nested_offset must be a finite number, got {offset!r}")
        nested = dict(nested_blocksize=_positive_int(state, "nested_blocksize", key),
                      nested_dtype=FLOAT_DTYPES[state["nested_dtype"]], nested_offset=float(offset))
    return QuantState4bit(quant_type=quant_type, blocksize=_positive_int(state, "blocksize", key),
                          dtype=FLOAT_DTYPES[state["dtype"]], shape=tuple(shape), **nested)


@dataclass(frozen=True)
class LogicalTensor:
    """One tensor of the float model a checkpoint stands for, and the checkpoint keys that hold it.

    kind "4bit": keys has "weight" (packed codes), "absmax", "quant_map", "quant_state" and, with double quant,
    "nested_absmax" and "nested_quant_map". kind "int8": "weight", "SCB" and usually "weight_format". kind "plain":
    "tensor" (stored as is: norms, embeddings, biases, modules transformers left unquantized).
    """

    name: str
    kind: str
    keys: Mapping[str, str]


def _four_bit_role(key: str) -> tuple[str, str] | None:
    """(logical weight name, role) when `key` is a 4-bit side tensor."""
    if f".weight.{QUANT_STATE_PREFIX}" in key:
        base, quant_type = key.split(f".weight.{QUANT_STATE_PREFIX}", 1)
        if quant_type not in QUANT_TYPES:
            raise BnbFormatError(key, f"unknown quant_type {quant_type!r} in the key; bitsandbytes has {QUANT_TYPES}")
        return base + ".weight", "quant_state"
    for suffix in FOUR_BIT_TENSOR_SUFFIXES:
        if key.endswith(".weight." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def group_tensors(names: Iterable[str]) -> list[LogicalTensor]:
    """Group every tensor name of a (possibly sharded) checkpoint into logical tensors, in first-seen order.

    Raises BnbFormatError when a quantized weight lacks a part (absmax, quant state, packed data, SCB, ...).
    """
    names = list(names)
    present = set(names)
    four: dict[str, dict[str, str]] = {}
    int8: dict[str, dict[str, str]] = {}
    order: dict[str, None] = {}  # logical names in first-seen order
    for key in names:
        four_bit = _four_bit_role(key)
        if four_bit:
            logical, role = four_bit
            if role in four.setdefault(logical, {}):
                raise BnbFormatError(key, f"{logical} has two quant states ({four[logical][role]} and {key})")
            four[logical][role] = key
        elif key.endswith("." + INT8_SCALE) or key.endswith("." + INT8_FORMAT):
            module, role = key.rsplit(".", 1)
            logical = module + ".weight"
            int8.setdefault(logical, {})[role] = key
        else:
            logical = key
        order.setdefault(logical, None)

    for logical, parts in four.items():
        if logical in int8:
            raise BnbFormatError(logical, "has both 4-bit parts and int8 parts (SCB/weight_format)")
        if logical not in present:
            raise BnbFormatError(logical, f"missing: found {sorted(parts.values())} but not the packed weight itself",
                                 "load every shard of the checkpoint")
        for role in ("quant_state", ABSMAX, QUANT_MAP):
            if role not in parts:
                what = f"{logical}.{QUANT_STATE_PREFIX}nf4|fp4" if role == "quant_state" else f"{logical}.{role}"
                raise BnbFormatError(what, f"missing for 4-bit weight {logical}", "load every shard of the checkpoint")
        if (NESTED_ABSMAX in parts) != (NESTED_QUANT_MAP in parts):
            have, lack = (NESTED_ABSMAX, NESTED_QUANT_MAP) if NESTED_ABSMAX in parts else (NESTED_QUANT_MAP,
                                                                                          NESTED_ABSMAX)
            raise BnbFormatError(f"{logical}.{lack}", f"missing, though {logical}.{have} is present (double quant "
                                                      "needs both)")
        parts["weight"] = logical
    for logical, parts in int8.items():
        if INT8_SCALE not in parts:
            raise BnbFormatError(logical.removesuffix("weight") + INT8_SCALE,
                                 f"missing for int8 weight {logical} (its weight_format is present)")
        if logical not in present:
            raise BnbFormatError(logical, f"missing: found {parts[INT8_SCALE]} but not the int8 weight itself")
        parts["weight"] = logical

    out = []
    for logical in order:
        if logical in four:
            out.append(LogicalTensor(logical, "4bit", four[logical]))
        elif logical in int8:
            out.append(LogicalTensor(logical, "int8", int8[logical]))
        else:
            out.append(LogicalTensor(logical, "plain", {"tensor": logical}))
    return out


def logical_shape_dtype(entry: LogicalTensor,
                        lookup: Callable[[str], torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the float tensor `entry` dequantizes to (4-bit: from its quant state; int8: float32, the
    dtype bitsandbytes and transformers dequantize to)."""
    if entry.kind == "4bit":
        state = parse_quant_state(lookup(entry.keys["quant_state"]), entry.keys["quant_state"])
        return state.shape, state.dtype
    tensor = lookup(entry.keys["weight" if entry.kind == "int8" else "tensor"])
    return tuple(tensor.shape), torch.float32 if entry.kind == "int8" else tensor.dtype
