"""Writing bitsandbytes checkpoints: the tensors and config transformers' quantize-on-load + save_pretrained writes.

The codes come from bitsandbytes itself (imported lazily: it is an optional extra), fed exactly as transformers feeds
it: the float weight cast to the model's dtype first (transformers loads the checkpoint in the model dtype, then
quantizes), Conv1D weights transposed to (out, in), and on the same kind of device (bitsandbytes' CPU and CUDA
quantizers are separate code).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from converters.bnb.format import DEFAULT_BLOCKSIZE, INT8_FORMAT, INT8_ROW, INT8_SCALE, QUANT_METHOD, QUANT_TYPES


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[1]  # what BitsAndBytesConfig.to_dict writes


def _prepare(weight: torch.Tensor, model_dtype: torch.dtype, conv1d: bool,
             device: torch.device | str | None) -> torch.Tensor:
    # Cast before transposing/moving: the value transformers quantizes is the checkpoint tensor in the model dtype.
    w = weight.detach().to(model_dtype)
    if conv1d:  # GPT-2's Conv1D stores (in, out); transformers quantizes W.T so the codes are (out, in)
        w = w.T
    return w.to(device if device is not None else w.device).contiguous()


def quantize_4bit(module: str, weight: torch.Tensor, *, model_dtype: torch.dtype, quant_type: str,
                  double_quant: bool, quant_storage: torch.dtype = torch.uint8,
                  blocksize: int = DEFAULT_BLOCKSIZE, conv1d: bool = False,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors ("<module>.weight", ".weight.absmax", ..., ".weight.quant_state.bitsandbytes__<type>")
    of one Linear quantized to NF4/FP4 as transformers does on load with BitsAndBytesConfig(load_in_4bit=True)."""
    import bitsandbytes.functional as bnbf

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{module}: unknown quant_type {quant_type!r}; bitsandbytes has {QUANT_TYPES}")
    w = _prepare(weight, model_dtype, conv1d, device)
    # Params4bit._quantize makes this very call (transformers builds Params4bit(value, ...).to(device)).
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type, quant_storage=quant_storage)
    out = {f"{module}.weight": packed}
    # Linear4bit._save_to_state_dict writes exactly the packed dict (quant_map, absmax, nested_*, JSON quant state).
    for key, value in state.as_dict(packed=True).items():
        out[f"{module}.weight.{key}"] = value
    return out


def quantize_int8(module: str, weight: torch.Tensor, *, model_dtype: torch.dtype, conv1d: bool,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors ("<module>.weight" int8, "<module>.SCB", "<module>.weight_format") of one Linear
    quantized as transformers does with BitsAndBytesConfig(load_in_8bit=True)."""
    import bitsandbytes.functional as bnbf

    w = _prepare(weight, model_dtype, conv1d, device)
    # Int8Params._quantize: cast to float16 (whatever the model dtype), then row-wise absmax quantization.
    codes, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    return {f"{module}.weight": codes, f"{module}.{INT8_SCALE}": scb,
            f"{module}.{INT8_FORMAT}": torch.tensor(INT8_ROW, dtype=torch.uint8)}


def quantization_config(bits: int, *, quant_type: str = "fp4", double_quant: bool = False,
                        compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
                        skip_modules: Sequence[str] | None = None, int8_threshold: float = 6.0) -> dict[str, Any]:
    """The ``quantization_config`` dict transformers writes into config.json for BitsAndBytesConfig(...) with these
    arguments (defaults are transformers' own: fp4, no double quant, float32 compute, uint8 storage)."""
    if bits not in (4, 8):
        raise ValueError(f"bitsandbytes quantizes to 4 or 8 bits, not {bits}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; bitsandbytes has {QUANT_TYPES}")
    return {
        "_load_in_4bit": bits == 4,
        "_load_in_8bit": bits == 8,
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": _dtype_name(quant_storage),
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None if skip_modules is None else list(skip_modules),
        "llm_int8_threshold": float(int8_threshold),
        "load_in_4bit": bits == 4,
        "load_in_8bit": bits == 8,
        "quant_method": QUANT_METHOD,
    }


def skip_patterns(*, output_embedding: str | None, last_parameter: str | None = None,
                  tied_parameters: Iterable[str] = (), skip_modules: Sequence[str] | None = None,
                  keep_in_fp32_modules: Iterable[str] = ()) -> list[str]:
    """The module-name patterns transformers keeps in float (HfQuantizer.get_modules_to_not_convert).

    Without `skip_modules` (llm_int8_skip_modules) transformers adds its default skips: the output embedding
    (`model.get_output_embeddings()`, e.g. "lm_head"), both sides of every tied weight, and the model's last
    parameter (`list(model.named_parameters())[-1]`), each with a ".weight" suffix removed. Passing skip_modules
    *replaces* those defaults, so lm_head is then quantized unless listed. The model class's _keep_in_fp32_modules are
    always added.
    """
    patterns: list[str] = []
    if skip_modules is None:
        defaults = [*tied_parameters, *(p for p in (last_parameter, output_embedding) if p)]
        patterns.extend(p.removesuffix(".weight") for p in defaults)
    else:
        patterns.extend(skip_modules)
    patterns.extend(keep_in_fp32_modules)
    return sorted(set(patterns))


def _skipped(module: str, patterns: Iterable[str]) -> bool:
    # transformers' should_convert_module: a pattern matches as a regex from the start up to a module boundary
    # ("layers.1" matches "layers.1.attn", not "layers.11.attn"), or as a plain suffix ("fc1").
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def modules_not_quantized(linear_modules: Iterable[str], *, output_embedding: str | None = "lm_head",
                          last_parameter: str | None = None, tied_parameters: Iterable[str] = (),
                          skip_modules: Sequence[str] | None = None,
                          keep_in_fp32_modules: Iterable[str] = ()) -> list[str]:
    """Which of the model's Linear (or Conv1D) modules transformers leaves in float when quantizing with bitsandbytes.

    `linear_modules`: names of modules whose type is exactly nn.Linear or Conv1D (transformers skips subclasses).
    Other arguments as for `skip_patterns`. Everything else (embeddings, norms, biases) is never quantized.
    """
    patterns = skip_patterns(output_embedding=output_embedding, last_parameter=last_parameter,
                             tied_parameters=tied_parameters, skip_modules=skip_modules,
                             keep_in_fp32_modules=keep_in_fp32_modules)
    return [m for m in linear_modules if _skipped(m, patterns)]
