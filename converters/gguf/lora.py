"""A LoRA adapter as a GGUF file for llama.cpp's --lora (and Ollama's ADAPTER).

llama.cpp computes each adapted layer as W·x + scale·B(A·x) with scale = user_scale·alpha/rank, or just user_scale
when adapter.lora.alpha is 0. We write alpha = 0 and fold each module's own PEFT scale into B, so rsLoRA (α/√r) and
per-module rank/alpha patterns come out right whatever single alpha the runtime assumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from converters.gguf.arch import ArchError, arch_for, gguf_tensor_name, hyperparameters, permute_rows, rope_heads


@dataclass(frozen=True)
class LoraPair:
    weight_name: str  # the HF weight it adapts, e.g. "model.layers.0.self_attn.q_proj.weight"
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float  # PEFT's scale for this module, folded into B


def write_gguf_lora(config: dict[str, Any], pairs: list[LoraPair], target: Path,
                    metadata: dict[str, str] | None = None) -> Path:
    spec = arch_for(config)
    hp = hyperparameters(config)
    tensors: list[tuple[str, np.ndarray]] = []
    for pair in pairs:
        name = gguf_tensor_name(spec, hp, pair.weight_name)
        if name is None or name.startswith("token_embd"):
            raise ArchError(f"'{pair.weight_name}' cannot carry a LoRA in llama.cpp's {spec.name} graph")
        b = pair.b.to(torch.float32) * pair.scale
        # The base's Q/K rows are permuted for llama's rope; B produces those rows, so it gets the same permutation.
        if (heads := rope_heads(spec, hp, pair.weight_name)) is not None:
            b = permute_rows(b, heads)
        tensors.append((f"{name}.lora_a", pair.a.to(torch.float32).contiguous().numpy()))
        tensors.append((f"{name}.lora_b", b.contiguous().numpy()))

    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, spec.name)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scale = user_scale: ours is already in B
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.rename(target)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return target
