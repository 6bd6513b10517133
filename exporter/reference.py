"""The unmerged model: the base loaded with transformers in float32 and the adapter applied on the fly by forward hooks.

This is parity's oracle, so it deliberately shares no code with the merge: the LoRA term is added to each adapted
module's *output* (x·Aᵀ·Bᵀ·s) instead of to its weight. Replacement modules (modules_to_save) swap the parameter
object, which also breaks a weight tie exactly as PEFT's ModulesToSaveWrapper does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exporter.adapter import Adapter, LoraModule


def _set_parameter(model: nn.Module, tensor_name: str, value: torch.Tensor) -> None:
    module_path, attr = tensor_name.rsplit(".", 1)
    module = model.get_submodule(module_path)
    setattr(module, attr, nn.Parameter(value.detach().clone(), requires_grad=False))
    if attr == "weight" and isinstance(module, nn.Embedding):
        module.num_embeddings = value.shape[0]
    elif attr == "weight" and isinstance(module, nn.Linear):
        module.out_features, module.in_features = value.shape


def _linear_hook(module: nn.Module, lora: LoraModule, adapter: Adapter, conv1d: bool) -> Any:
    a = adapter.tensor(lora.a_key).to(torch.float32)
    b = adapter.tensor(lora.b_key).to(torch.float32)
    b_bias = adapter.tensor(lora.b_bias_key).to(torch.float32) if lora.b_bias_key else None
    s = lora.scale
    factor = None
    if lora.magnitude_key:
        # DoRA: y = m/‖W + s·BA‖ ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias, the norm per output unit (PEFT's DoraLinearLayer).
        w = module.weight.detach().to(torch.float32)
        w_out_in = w.T if conv1d else w
        norm = torch.linalg.vector_norm(w_out_in + s * (b @ a), dim=1)
        factor = adapter.tensor(lora.magnitude_key).to(torch.float32) / norm

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(torch.float32)
        delta = (x @ a.T) @ b.T
        if b_bias is not None:
            delta = delta + b_bias
        delta = delta * s
        if factor is None:
            return (output.to(torch.float32) + delta).to(output.dtype)
        bias = getattr(mod, "bias", None)
        base = output.to(torch.float32) - (bias.to(torch.float32) if bias is not None else 0.0)
        merged = factor * (base + delta) + (bias.to(torch.float32) if bias is not None else 0.0)
        return merged.to(output.dtype)

    return hook


def _embedding_hook(lora: LoraModule, adapter: Adapter) -> Any:
    a = adapter.tensor(lora.a_key).to(torch.float32)  # (r, vocab)
    b = adapter.tensor(lora.b_key).to(torch.float32)  # (dim, r)
    s = lora.scale

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = F.embedding(args[0], a.T) @ b.T * s
        # Scaled embeddings (Gemma) multiply the looked-up rows, so the LoRA rows are scaled too, as in PEFT.
        scale = getattr(mod, "embed_scale", None)
        if scale is not None:
            delta = delta * scale.to(torch.float32)
        return (output.to(torch.float32) + delta).to(output.dtype)

    return hook


def load_reference(base_path: Path, adapter: Adapter, device: torch.device) -> nn.Module:
    """Base (float32) + adapter applied on the fly. Never trusts remote code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=False)
    model.eval()
    with torch.no_grad():
        for tensor_name, key in adapter.replacements.items():
            _set_parameter(model, tensor_name, adapter.tensor(key).to(torch.float32))
        for lora in adapter.modules.values():
            if lora.base_override_key:
                _set_parameter(model, lora.weight_name, adapter.tensor(lora.base_override_key).to(torch.float32))
        vocab = model.get_input_embeddings().weight.shape[0]
        model.config.vocab_size = vocab
        for lora in adapter.modules.values():
            module = model.get_submodule(lora.name)
            if lora.kind == "embedding":
                module.register_forward_hook(_embedding_hook(lora, adapter))
            else:
                conv1d = type(module).__name__ == "Conv1D"
                module.register_forward_hook(_linear_hook(module, lora, adapter, conv1d))
    return model.to(device)
