"""bitsandbytes dequantization in plain torch, bit for bit what bitsandbytes' kernels compute.

4-bit (NF4/FP4), for value i of the flattened weight (block b = i // blocksize):
    scale[b] = absmax[b]                                                        (plain)
    scale[b] = float32((nested_map[absmax[b]] * nested_absmax[b // 256]).to(nested_dtype) + offset)  (double quant)
    w[i]     = (table[code[i]] * scale[b]).to(dtype)        one float32 multiply, then round-to-nearest-even once
code[i] is the high nibble of byte i // 2 for even i, the low nibble for odd i. Blocks run over the flattened weight
(not per row), so a block may straddle rows and the last one may be short.
int8: w = weight * SCB[row] * 7.874015718698502e-3 in float32, multiplied in that order (the constant is
float32(1/127)); bitsandbytes' int8_vectorwise_dequant returns that float32, and transformers' model.dequantize()
casts it once to the model's dtype (pass `dtype=` for that).

No bitsandbytes import: the format needs only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from converters.bnb.format import (ABSMAX, INT8_FORMAT, INT8_FORMATS, INT8_ROW, INT8_SCALE, NESTED_ABSMAX,
                                   NESTED_QUANT_MAP, QUANT_MAP, BnbFormatError, LogicalTensor, QuantState4bit,
                                   code_table, parse_quant_state)

INT8_INV_127 = 7.874015718698502e-3  # float32(1/127), the constant bitsandbytes multiplies by
NESTED_MAP_SIZE = 256


def _byte_pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256, 2): the two values a packed byte stands for, high nibble first."""
    table = code_table(quant_type, device)
    codes = torch.arange(256, device=device)
    return torch.stack((table[codes >> 4], table[codes & 0x0F]), dim=1)


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in float32 over the flat tensor (last block may be short)."""
    n = values.numel()
    padded = F.pad(values, (0, -n % blocksize))
    return (padded.view(-1, blocksize) * scales.view(-1, 1)).view(-1)[:n]


def _check_float(tensor: torch.Tensor, key: str, numel: int, why: str) -> None:
    if not tensor.dtype.is_floating_point:
        raise BnbFormatError(key, f"must be a float tensor, got {tensor.dtype}")
    if tensor.numel() != numel:
        raise BnbFormatError(key, f"has shape {tuple(tensor.shape)} ({tensor.numel()} values) but {why} needs {numel}")


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, state: QuantState4bit,
                    nested_absmax: torch.Tensor | None = None, nested_quant_map: torch.Tensor | None = None, *,
                    name: str = "weight", device: torch.device | str | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """A 4-bit weight as the tensors in the file hold it -> the float weight (state.dtype, state.shape).

    `packed` may be stored as any dtype (bnb_4bit_quant_storage): only its bytes count. `name` is the logical weight's
    key ("<module>.weight"), used in error messages.
    """
    _validate_4bit(packed, absmax, quant_map, state, nested_absmax, nested_quant_map, name)
    device = torch.device(device) if device is not None else packed.device
    data = packed.detach().reshape(-1).view(torch.uint8)  # a no-op view for uint8 storage
    need = -(-state.numel // 2)
    if state.nested:
        # bitsandbytes: dequantize_blockwise(absmax codes) in nested_dtype, `+= offset` (a float32 0-d tensor), then
        # .float(); the same torch ops give the same roundings.
        codes = absmax.detach().to(device).reshape(-1).int()
        scales = nested_quant_map.detach().to(device).float().reshape(-1).index_select(0, codes)
        scales = _scale_blocks(scales, nested_absmax.detach().to(device).float().reshape(-1), state.nested_blocksize)
        scales = scales.to(state.nested_dtype)
        scales += torch.tensor(state.nested_offset, dtype=torch.float32, device=device)
        scales = scales.float()
    else:
        scales = absmax.detach().to(device).float().reshape(-1)
    return _decode(_byte_pair_table(state.quant_type, device), data[:need].to(device), scales, state, out)


def _validate_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, state: QuantState4bit,
                   nested_absmax: torch.Tensor | None, nested_quant_map: torch.Tensor | None, name: str) -> None:
    """Every part of a 4-bit weight against its quant state: dtypes and sizes (read from the tensors' metadata only,
    so the big parts may be meta tensors) and the code table's values."""
    n, blocks = state.numel, state.n_blocks
    stored = packed.numel() * packed.element_size()  # bytes, whatever the storage dtype
    need = -(-n // 2)
    slack = packed.element_size() if packed.dtype != torch.uint8 else 1  # storage dtypes round the bytes up
    if not need <= stored < need + slack:
        raise BnbFormatError(name, f"packed data holds {stored} bytes ({packed.dtype} {tuple(packed.shape)}) "
                                   f"but the declared shape {list(state.shape)} needs {need} (two 4-bit codes a byte)")
    shape_why = f"shape {list(state.shape)} with blocksize {state.blocksize}"
    if not (quant_map.dtype.is_floating_point and quant_map.numel() == 16):
        raise BnbFormatError(f"{name}.{QUANT_MAP}", f"must be 16 float values, got {quant_map.dtype} "
                                                    f"{tuple(quant_map.shape)}")
    table = code_table(state.quant_type)
    if not torch.allclose(quant_map.detach().float().cpu().reshape(-1), table, rtol=0, atol=1e-6):
        raise BnbFormatError(f"{name}.{QUANT_MAP}", f"is not the {state.quant_type} code table (is the quant type "
                                                    "right?)")
    if state.nested != (nested_absmax is not None) or state.nested != (nested_quant_map is not None):
        raise BnbFormatError(f"{name}.{NESTED_ABSMAX}", "double-quant tensors and the quant state disagree: "
                             f"quant state nested={state.nested}, nested_absmax "
                             f"{'given' if nested_absmax is not None else 'missing'}, nested_quant_map "
                             f"{'given' if nested_quant_map is not None else 'missing'}")

    if state.nested:
        assert nested_absmax is not None and nested_quant_map is not None and state.nested_blocksize is not None
        if absmax.dtype != torch.uint8 or absmax.numel() != blocks:
            raise BnbFormatError(f"{name}.{ABSMAX}", f"with double quant must be {blocks} uint8 codes (one per block "
                                 f"of {shape_why}), got {absmax.dtype} {tuple(absmax.shape)}")
        nested_blocks = -(-blocks // state.nested_blocksize)
        _check_float(nested_absmax, f"{name}.{NESTED_ABSMAX}", nested_blocks,
                     f"{blocks} absmax codes in blocks of {state.nested_blocksize}")
        _check_float(nested_quant_map, f"{name}.{NESTED_QUANT_MAP}", NESTED_MAP_SIZE, "an 8-bit code table")
    else:
        _check_float(absmax, f"{name}.{ABSMAX}", blocks, f"one per block of {shape_why}")


# Values decoded per step: a multiple of every blocksize in use and of 2 (a byte holds two), 1 MiB of float32, so the
# step's lookups, scaling and cast run in cache and in reused buffers (whole-tensor passes faulted in three fresh
# tensors of the weight's size: 155 M values/s single-threaded; in chunks several times that).
_CHUNK_VALUES = 1 << 18


def _decode(pairs: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, state: QuantState4bit,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight: each byte's two code values (high nibble first) times its block's scale, one float32
    multiply, then one cast to state.dtype (bitsandbytes' order of operations, so the same roundings). ``out``: a
    flat buffer of at least the weight's size and state.dtype to decode into (a caller's reused memory)."""
    n, blocksize = state.numel, state.blocksize
    out = torch.empty(n, dtype=state.dtype, device=data.device) if out is None else out[:n]
    chunk = max(_CHUNK_VALUES // (2 * blocksize), 1) * 2 * blocksize
    work = torch.empty(min(chunk, n + n % 2), dtype=torch.float32, device=data.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        decoded = work[: stop - start + (stop - start) % 2].view(-1, 2)
        torch.index_select(pairs, 0, data[start // 2: (stop + 1) // 2].int(), out=decoded)
        values = work[: stop - start]
        block = scales[start // blocksize: -(-stop // blocksize)]
        if (stop - start) % blocksize == 0:
            values.view(-1, blocksize).mul_(block.view(-1, 1))
        else:  # the weight's last, short block
            values.copy_(_scale_blocks(values, block, blocksize))
        out[start:stop].copy_(values)
    return out.view(state.shape)


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor, weight_format: torch.Tensor | int | None = None, *,
                    name: str = "weight", device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """An LLM.int8() weight (int8 codes + SCB row absmax) -> float32 as bitsandbytes computes it, then cast once to
    `dtype` if given (transformers' model.dequantize(dtype) casts that float32 result to the model's dtype)."""
    _validate_int8(weight, scb, weight_format, name)
    device = torch.device(device) if device is not None else weight.device
    out = weight.detach().to(device) * scb.detach().to(device).view(-1, 1) * INT8_INV_127
    return out if dtype is None else out.to(dtype)


def _validate_int8(weight: torch.Tensor, scb: torch.Tensor, weight_format: torch.Tensor | int | None, name: str) -> None:
    module = name.removesuffix("weight")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise BnbFormatError(name, f"int8 weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    _check_float(scb, module + INT8_SCALE, weight.shape[0], f"an int8 weight with {weight.shape[0]} rows")
    if weight_format is not None:
        fmt = int(weight_format.item()) if isinstance(weight_format, torch.Tensor) else int(weight_format)
        if fmt != INT8_ROW:
            raise BnbFormatError(module + INT8_FORMAT, f"is {fmt} ({INT8_FORMATS.get(fmt, 'unknown')}); only "
                                                       f"{INT8_ROW} (row-major) is loadable")


def validate(entry: LogicalTensor, lookup: Callable[[str], torch.Tensor]) -> None:
    """Raise BnbFormatError where dequantizing `entry` would: every check, none of the work. `lookup` may return
    meta tensors for the weight-sized parts (only their dtype and shape are read)."""
    keys = entry.keys
    if entry.kind == "int8":
        fmt = lookup(keys[INT8_FORMAT]) if INT8_FORMAT in keys else None
        _validate_int8(lookup(keys["weight"]), lookup(keys[INT8_SCALE]), fmt, entry.name)
    elif entry.kind == "4bit":
        state = parse_quant_state(lookup(keys["quant_state"]), keys["quant_state"])
        nested = [lookup(keys[k]) if k in keys else None for k in (NESTED_ABSMAX, NESTED_QUANT_MAP)]
        _validate_4bit(lookup(keys["weight"]), lookup(keys[ABSMAX]), lookup(keys[QUANT_MAP]), state, *nested,
                       entry.name)


def dequantize(entry: LogicalTensor, lookup: Callable[[str], torch.Tensor],
               device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float tensor of one logical tensor from `group_tensors`; `lookup(key)` returns a checkpoint tensor. ``out``
    (4-bit only): a flat buffer of the weight's dtype to decode into."""
    keys = entry.keys
    if entry.kind == "plain":
        tensor = lookup(keys["tensor"])
        return tensor.to(device) if device is not None else tensor
    if entry.kind == "int8":
        fmt = lookup(keys[INT8_FORMAT]) if INT8_FORMAT in keys else None
        return dequantize_int8(lookup(keys["weight"]), lookup(keys[INT8_SCALE]), fmt, name=entry.name, device=device)
    state = parse_quant_state(lookup(keys["quant_state"]), keys["quant_state"])
    nested = [lookup(keys[k]) if k in keys else None for k in (NESTED_ABSMAX, NESTED_QUANT_MAP)]
    return dequantize_4bit(lookup(keys["weight"]), lookup(keys[ABSMAX]), lookup(keys[QUANT_MAP]), state, *nested,
                           name=entry.name, device=device, out=out)
