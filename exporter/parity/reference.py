"""The unmerged model: the base in float32 with the adapter applied on the fly by forward hooks, its weights loaded
whole or module by module (exporter/parity/layerwise.py).

This is parity's oracle, so it shares no code with the merge, not even the reading of the adapter: the few facts it
needs (which modules carry LoRA, their A/B/bias/magnitude tensors, α per module, rsLoRA, modules_to_save) are read here
from adapter_config.json and the tensor names directly, with the safetensors library rather than our own reader. A
bug in exporter/adapter.py (a pattern matched wrongly, a scale formula) therefore shows up as a parity failure
instead of being repeated on both sides. The LoRA term is added to each adapted module's *output* (x·Aᵀ·Bᵀ·s)
instead of to its weight, and A/B are read when the module runs, so memory holds one module's LoRA at a time.
Replacement modules (modules_to_save) swap the parameter object, which also breaks a weight tie exactly as PEFT's
ModulesToSaveWrapper does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exporter.parity.layerwise import CheckpointTensors, LoadedWeights, WeightSource, checkpoint_sources, \
    set_meta_parameter, skeleton

_KEY_PREFIX = "base_model.model."
# PEFT's LoraConfig defaults, used when adapter_config.json leaves a key out.
_DEFAULT_ALPHA = 8  # (r needs no default: the rank is the shape of lora_A)


@dataclass
class AdapterTerms:
    """What the reference applies: per adapted module its LoRA tensors and scale, plus whole-tensor replacements."""

    lora: dict[str, dict[str, Any]]  # module -> {"A", "B", "bias", "magnitude": keys or None, "embedding", "scale"}
    replaced: dict[str, str]  # parameter name -> key of the tensor that replaces it
    tensor: Any = field(repr=False)  # key -> torch.Tensor
    shape: Any = field(repr=False)  # key -> its shape, without reading it

    def get(self, key: str) -> torch.Tensor:
        return self.tensor(key).to(torch.float32)


def _alpha_for(module: str, config: dict[str, Any]) -> float:
    """α for one module: the first alpha_pattern key that matches a dotted suffix of its name (PEFT's rule), else
    lora_alpha. Written as a full match over the name, not as the merge side's suffix search."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return float(alpha)
    alpha = config.get("lora_alpha")
    return float(alpha if alpha is not None else _DEFAULT_ALPHA)


def _open_tensors(folder: Path, allow_pickle: bool) -> tuple[list[str], Any, Any]:
    path = folder / "adapter_model.safetensors"
    if path.is_file():
        from safetensors import safe_open

        def read(key: str) -> torch.Tensor:
            # A handle per read: the library reads through a memory map, and one kept open would leave every page
            # read resident for the rest of the run (a 70B adapter is gigabytes).
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(key)

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
        return keys, read, shapes.__getitem__
    if allow_pickle:
        state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        return list(state), state.__getitem__, lambda key: tuple(state[key].shape)
    raise FileNotFoundError(path)


def read_adapter_terms(folder: Path, allow_pickle: bool = False) -> AdapterTerms:
    config = json.loads((folder / "adapter_config.json").read_text())
    keys, tensor, shape = _open_tensors(folder, allow_pickle)
    parts: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix(_KEY_PREFIX)
        if ".original_module." in name:
            continue  # PEFT's untouched copy of a modules_to_save layer
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                             r"(?:\.(weight|bias))?", name)
        if match:
            module, part, suffix = match.groups()
            parts.setdefault(module, {})["bias" if suffix == "bias" else part] = key
        elif name.endswith(".base_layer.weight"):
            replaced[name.replace(".base_layer.", ".")] = key  # a resized layer PEFT saved beside its LoRA
        elif ".modules_to_save." in name:
            replaced[name.replace(".modules_to_save.", ".")] = key  # the trained copy, whatever else was saved
        else:
            replaced.setdefault(name, key)
    use_rslora = bool(config.get("use_rslora", False))
    lora = {}
    for module, found in parts.items():
        embedding = "lora_embedding_A" in found
        a_key = found["lora_embedding_A" if embedding else "lora_A"]
        rank = shape(a_key)[0]  # the rank the adapter was trained with is the shape of A
        alpha = _alpha_for(module, config)
        lora[module] = {"A": a_key, "B": found["lora_embedding_B" if embedding else "lora_B"],
                        "bias": found.get("bias"), "magnitude": found.get("lora_magnitude_vector"),
                        "embedding": embedding, "scale": alpha / (rank**0.5 if use_rslora else rank)}
    return AdapterTerms(lora, replaced, tensor, shape)


def _linear_hook(term: dict[str, Any], terms: AdapterTerms, conv1d: bool) -> Any:
    s = term["scale"]

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        a, b = terms.get(term["A"]), terms.get(term["B"])  # read now: one module's LoRA in memory at a time
        x = args[0].to(torch.float32)
        delta = (x @ a.T) @ b.T
        if term["bias"]:
            delta = delta + terms.get(term["bias"])
        delta = delta * s
        if not term["magnitude"]:
            return (output.to(torch.float32) + delta).to(output.dtype)
        # DoRA: y = m/‖W + s·BA‖ ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias, the norm per output unit (PEFT's DoraLinearLayer).
        w = mod.weight.detach().to(torch.float32)
        norm = torch.linalg.vector_norm((w.T if conv1d else w) + s * (b @ a), dim=1)
        factor = terms.get(term["magnitude"]) / norm
        bias = getattr(mod, "bias", None)
        base = output.to(torch.float32) - (bias.to(torch.float32) if bias is not None else 0.0)
        merged = factor * (base + delta) + (bias.to(torch.float32) if bias is not None else 0.0)
        return merged.to(output.dtype)

    return hook


def _embedding_hook(term: dict[str, Any], terms: AdapterTerms) -> Any:
    s = term["scale"]

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        a, b = terms.get(term["A"]), terms.get(term["B"])  # A (r, vocab), B (dim, r)
        delta = F.embedding(args[0], a.T) @ b.T * s
        # Scaled embeddings (Gemma) multiply the looked-up rows, so the LoRA rows are scaled too, as in PEFT.
        scale = getattr(mod, "embed_scale", None)
        if scale is not None:
            delta = delta * scale.to(torch.float32)
        return (output.to(torch.float32) + delta).to(output.dtype)

    return hook


def _embedding_delta_hook(name: str, deltas: Any) -> Any:
    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = F.embedding(args[0], deltas.delta(name))  # ΔW is (vocab, dim), in the embedding's own frame
        scale = getattr(mod, "embed_scale", None)
        if scale is not None:
            delta = delta * scale.to(torch.float32)
        return (output.to(torch.float32) + delta).to(output.dtype)

    return hook


class BaseModelTensors:
    """A base's tensors as exporter/base.py presents them (a bitsandbytes base: dequantized), for the reference of a
    quantized base: what QLoRA training computed with."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __contains__(self, name: str) -> bool:
        return self.base.has(name)

    def source(self, name: str) -> WeightSource:
        return lambda: self.base.tensor(name).to(torch.float32)


def load_reference(base_path: Path, adapters: Path | Sequence[tuple[Path, float]] | None, device: torch.device,
                   allow_pickle: bool = False, *, mode: str = "whole", base_tensors: Any = None,
                   on_module: Callable[[], None] | None = None, model: nn.Module | None = None,
                   deltas: Any = None) -> nn.Module:
    """Base (float32) + adapters applied on the fly (``adapters``: one adapter folder, or (folder, weight) pairs whose
    changes add up, each scaled by its weight; None: the base alone), weights loaded ``mode`` = "whole" or
    "streamed". The base's weights come from its safetensors checkpoint (read with the safetensors library), or from
    ``base_tensors`` (e.g. BaseModelTensors of a dequantized base). ``model``: skeleton(base_path), when the caller
    has built it already. ``deltas``: a delta-space combination (exporter/combine.py's DeltaCombination) whose ΔW
    each adapted weight gets as it is loaded (an embedding's, as its output). Never trusts remote code."""
    model = model if model is not None else skeleton(Path(base_path))
    sources = checkpoint_sources(model, base_tensors if base_tensors is not None
                                 else CheckpointTensors(Path(base_path)))
    if isinstance(adapters, (str, Path)):
        adapters = [(Path(adapters), 1.0)]
    for adapter_dir, weight in adapters or ():
        terms = read_adapter_terms(Path(adapter_dir), allow_pickle)
        for tensor_name, key in terms.replaced.items():
            set_meta_parameter(model, tensor_name, terms.shape(key))
            sources[tensor_name] = lambda key=key: terms.get(key)
        model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
        for module_name, term in terms.lora.items():
            term["scale"] *= weight  # each hook adds its own change: several adapters sum
            module = model.get_submodule(module_name)
            if term["embedding"]:
                module.register_forward_hook(_embedding_hook(term, terms))
            else:
                module.register_forward_hook(_linear_hook(term, terms, type(module).__name__ == "Conv1D"))
    if deltas is not None:
        for module_name in deltas.modules:
            module = model.get_submodule(module_name)
            if isinstance(module, nn.Embedding):  # a hook, not the weight: a tied output head keeps the base's
                module.register_forward_hook(_embedding_delta_hook(module_name, deltas))
                continue
            weight, conv1d = f"{module_name}.weight", type(module).__name__ == "Conv1D"

            def merged(read: Callable[[], torch.Tensor] = sources[weight], name: str = module_name,
                       conv1d: bool = conv1d) -> torch.Tensor:
                delta = deltas.delta(name)
                return read().to(torch.float32) + (delta.T if conv1d else delta)

            sources[weight] = merged
    LoadedWeights(model, sources, mode, device, on_module)  # after the LoRA hooks: weights are dropped after them
    return model
