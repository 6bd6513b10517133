"""How the adapter's tensors land on the base model's tensors: the output layout the merge streams through.

Built once, before anything is written, so every mismatch between adapter and base is found up front and reported
together. Module types (Linear, GPT-2's Conv1D, Embedding) come from the architecture instantiated on the meta device
(no weights, no memory); tied embeddings and resized vocabularies are decided here.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from converters.safetensors_format import DTYPE_NAMES
from converters.safetensors_out import TensorSpec
from exporter.adapter import Adapter, LoraModule
from exporter.base import BaseModel
from exporter.errors import InputError, MismatchError

log = logging.getLogger("lora_export")


class Source(enum.Enum):
    """Where an output tensor's values come from."""

    COPY = "copy"  # the base tensor as stored (or cast)
    MERGE = "merge"  # the base weight + s·B@A
    REPLACE = "replace"  # a full tensor from the adapter (modules_to_save, a saved bias)
    BIAS = "bias"  # the base bias + s·lora_B.bias


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model and where its values come from."""

    name: str
    source: Source
    base_name: str | None  # base tensor read (for copy/merge/bias); None when the adapter supplies the values
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    module: LoraModule | None = None
    adapter_key: str | None = None  # replace: the full tensor; merge: an override of the base weight
    layout: str = "linear"  # merge: "linear" | "conv1d" | "embedding"

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, DTYPE_NAMES[self.dtype], self.shape)


@dataclass
class MergeLayout:
    tensors: list[OutputTensor]
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    base_vocab: int | None = None  # rows of the base's input embedding, before any resize


# Architectures whose adaptable weights are all nn.Linear, with their input and output embedding modules: for these
# the model need not be built at all (importing transformers' modeling code costs ~2 s per run). Other architectures
# (GPT-2's Conv1D, anything new) are instantiated on the meta device. tests/test_layout.py checks this table against
# transformers itself.
LINEAR_ARCHITECTURES: dict[str, tuple[str, str]] = {
    model_type: ("model.embed_tokens", "lm_head")
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
}


def module_types(base: BaseModel) -> tuple[dict[str, str], str | None, str | None, str | None]:
    """({module name: linear|conv1d|embedding}, default kind for modules not listed, input-embedding and
    output-embedding module names)."""
    known = LINEAR_ARCHITECTURES.get(base.config.get("model_type", ""))
    if known is not None:
        return {known[0]: "embedding"}, "linear", known[0], known[1]
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(base.path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an architecture transformers does not know: fall back to shapes
        log.warning("could not instantiate %s on the meta device (%s); module types are inferred from shapes",
                    base.path, e)
        return {}, None, None, None
    kinds: dict[str, str] = {}
    by_id: dict[int, str] = {}
    for name, module in model.named_modules():
        by_id[id(module)] = name
        if isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    return kinds, None, by_id.get(id(inp)), (by_id.get(id(outp)) if outp is not None else None)


def _expected_shape(layout: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, int]:
    if layout == "linear":
        return (b_shape[0], a_shape[1])  # W (out, in) from B (out, r), A (r, in)
    return (a_shape[1], b_shape[0])  # Conv1D W (in, out); Embedding W (vocab, dim) from A (r, vocab), B (dim, r)


@dataclass(frozen=True)
class _BaseFacts:
    """What the layout needs to know about the base beyond its tensors: module types and the embedding ends."""

    base: BaseModel
    kinds: dict[str, str]  # module name -> linear|conv1d|embedding
    default_kind: str | None  # for modules not in kinds; None: infer from shapes
    input_weight: str | None
    output_weight: str | None
    tied: bool  # the output head is stored as the input embedding

    def source(self, weight_name: str) -> str | None:
        """The base tensor that holds this weight's values, or None when the base has none."""
        if self.base.has(weight_name):
            return weight_name
        if (self.tied and weight_name == self.output_weight and self.input_weight
                and self.base.has(self.input_weight)):
            return self.input_weight  # the output head *is* the input embedding until we untie it
        return None


def _base_facts(base: BaseModel) -> _BaseFacts:
    kinds, default_kind, input_embed, output_embed = module_types(base)
    input_weight = f"{input_embed}.weight" if input_embed else None
    output_weight = f"{output_embed}.weight" if output_embed else None
    tied = base.tie_word_embeddings and output_weight is not None and not base.has(output_weight)
    return _BaseFacts(base, kinds, default_kind, input_weight, output_weight, tied)


def _merge_kind(module: LoraModule, facts: _BaseFacts, adapter: Adapter, w_shape: tuple[int, ...],
                a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> str:
    """How B@A lies on this module's weight: "linear", "conv1d" or "embedding"."""
    if module.kind == "embedding":
        return "embedding"
    layout = facts.kinds.get(module.name) or facts.default_kind or ""
    if layout in ("linear", "conv1d"):
        return layout
    # Unknown module type: infer from shapes; a square weight follows the adapter's fan_in_fan_out.
    as_linear = tuple(w_shape) == _expected_shape("linear", a_shape, b_shape)
    as_conv = tuple(w_shape) == _expected_shape("conv1d", a_shape, b_shape)
    return "conv1d" if as_conv and (not as_linear or adapter.config.get("fan_in_fan_out")) else "linear"


def _merged_weight(module: LoraModule, facts: _BaseFacts, adapter: Adapter, out_dtype: torch.dtype,
                   problems: list[str]) -> OutputTensor | None:
    """The module's weight merged with s·B@A; None (with the reason in problems) when it does not fit the base."""
    src = facts.source(module.weight_name)
    override = module.base_override_key
    if src is None and override is None:
        problems.append(f"'{module.name}' is adapted but the base has no tensor '{module.weight_name}'")
        return None
    w_shape = adapter.shape(override) if override else facts.base.info(src).shape
    a_shape, b_shape = adapter.shape(module.a_key), adapter.shape(module.b_key)
    layout = _merge_kind(module, facts, adapter, w_shape, a_shape, b_shape)
    expected = _expected_shape(layout, a_shape, b_shape)
    if tuple(w_shape) != expected:
        problems.append(f"'{module.name}' ({layout}) base weight {tuple(w_shape)} but adapter A {a_shape} / "
                        f"B {b_shape} need {expected}")
        return None
    if module.magnitude_key:
        n_out = expected[1] if layout == "conv1d" else expected[0]
        if adapter.shape(module.magnitude_key) != (n_out,):
            problems.append(f"'{module.name}' DoRA magnitude {adapter.shape(module.magnitude_key)} but the "
                            f"layer has {n_out} outputs")
    return OutputTensor(module.weight_name, Source.MERGE, src, tuple(w_shape), out_dtype,
                        module=module, adapter_key=override, layout=layout)


def _merged_bias(module: LoraModule, base: BaseModel, out_dtype: torch.dtype,
                 problems: list[str]) -> OutputTensor | None:
    """The base bias plus the module's LoRA bias (lora_bias); None when it has none, or the base layer lacks one."""
    if not module.b_bias_key:
        return None
    bias_name = f"{module.name}.bias"
    if not base.has(bias_name):
        problems.append(f"'{module.name}' has a LoRA bias (lora_bias) but the base layer has no bias")
        return None
    return OutputTensor(bias_name, Source.BIAS, bias_name, base.info(bias_name).shape, out_dtype, module=module)


def _lora_merges(facts: _BaseFacts, adapter: Adapter, out_dtype: torch.dtype,
                 problems: list[str]) -> tuple[dict[str, OutputTensor], dict[str, OutputTensor]]:
    """The merged weights and merged biases of every LoRA module, by output tensor name."""
    merges: dict[str, OutputTensor] = {}
    bias_merges: dict[str, OutputTensor] = {}
    for module in adapter.modules.values():
        merged = _merged_weight(module, facts, adapter, out_dtype, problems)
        if merged is None:
            continue  # its bias is checked only once the weight fits
        merges[module.weight_name] = merged
        bias = _merged_bias(module, facts.base, out_dtype, problems)
        if bias is not None:
            bias_merges[bias.name] = bias
    return merges, bias_merges


def _replacements(facts: _BaseFacts, adapter: Adapter, out_dtype: torch.dtype,
                  problems: list[str]) -> tuple[dict[str, OutputTensor], int | None]:
    """The full tensors the adapter replaces (modules_to_save), by name, and the vocabulary size a resized
    embedding among them sets (None when none is resized)."""
    replaces: dict[str, OutputTensor] = {}
    vocab_size: int | None = None
    for name, key in adapter.replacements.items():
        new_shape = adapter.shape(key)
        src = facts.source(name)
        if src is None:
            problems.append(f"modules_to_save tensor '{name}' has no counterpart in the base")
            continue
        old_shape = facts.base.info(src).shape
        resized = (len(old_shape) == 2 and name in (facts.input_weight, facts.output_weight)
                   and new_shape[1:] == old_shape[1:])
        if new_shape != old_shape and not resized:
            problems.append(f"modules_to_save tensor '{name}' is {new_shape} but the base has {old_shape}")
            continue
        if new_shape != old_shape:
            vocab_size = new_shape[0]
        dtype = out_dtype if adapter.dtype(key).is_floating_point else adapter.dtype(key)
        replaces[name] = OutputTensor(name, Source.REPLACE, None, new_shape, dtype, adapter_key=key)
    return replaces, vocab_size


def _raise_mismatches(problems: list[str], base: BaseModel, adapter: Adapter) -> None:
    """Every way the adapter does not fit the base, in one error."""
    if problems:
        raise MismatchError(str(adapter.path), f"does not fit the base model {base.path}: " + "; ".join(problems) + ".",
                            "pass the base model this adapter was trained on (adapter_config.json names "
                            f"'{adapter.base_model_name}').")


def _check_vocab_ends(vocab: int, facts: _BaseFacts, adapter: Adapter, merges: dict[str, OutputTensor],
                      replaces: dict[str, OutputTensor]) -> None:
    """Both ends of the vocabulary must agree on its size."""
    for weight in (facts.input_weight, facts.output_weight):
        if weight is None or (weight == facts.output_weight and facts.tied and weight in replaces):
            continue
        entry = replaces.get(weight) or merges.get(weight)
        shape = entry.shape if entry else facts.base.info(facts.source(weight) or weight).shape
        if shape[0] != vocab:
            raise MismatchError(str(adapter.path), f"resizes the vocabulary to {vocab} but '{weight}' keeps "
                                f"{shape[0]} rows, and its new rows are not in the adapter.",
                                "train with modules_to_save covering both embed_tokens and lm_head (or the "
                                "embedding layers saved: save_embedding_layers=True).")


def _in_base_order(base: BaseModel, out_dtype: torch.dtype, merges: dict[str, OutputTensor],
                   bias_merges: dict[str, OutputTensor], replaces: dict[str, OutputTensor]) -> list[OutputTensor]:
    """Every base tensor, in file order: merged, replaced, or else copied (cast to the output dtype if floating)."""
    tensors: list[OutputTensor] = []
    for info in base.tensors.values():  # file order
        name = info.name
        entry = merges.get(name) or bias_merges.get(name) or replaces.get(name)
        if entry is None:
            dtype = out_dtype if info.torch_dtype.is_floating_point else info.torch_dtype
            entry = OutputTensor(name, Source.COPY, name, info.shape, dtype)
        tensors.append(entry)
    return tensors


def _untied_head(facts: _BaseFacts, out_dtype: torch.dtype, merges: dict[str, OutputTensor],
                 replaces: dict[str, OutputTensor]) -> tuple[OutputTensor, str] | None:
    """The output head to write beside the input embedding, and a note saying why, when the adapter changes either
    end of tied embeddings; None otherwise.

    PEFT's lm_head LoRA (or embedding LoRA) changes one end only, so the merged model has two different matrices and
    must say so in its config, or loaders re-tie them and drop the change (peft #2018).
    """
    input_weight, output_weight = facts.input_weight, facts.output_weight
    head_changed = output_weight in merges or output_weight in replaces
    if not (facts.tied and output_weight and input_weight and (head_changed or input_weight in merges
                                                                or input_weight in replaces)):
        return None
    head = merges.get(output_weight) or replaces.get(output_weight)
    if head is None:
        info = facts.base.info(input_weight)
        head = OutputTensor(output_weight, Source.COPY, input_weight, info.shape, out_dtype)
    changed = "the output head" if head_changed else "the input embedding"
    note = (f"the adapter changes {changed} of a model with tied embeddings: both '{input_weight}' and "
            f"'{output_weight}' are written and tie_word_embeddings is set to false")
    return head, note


def build_layout(base: BaseModel, adapter: Adapter, out_dtype: torch.dtype) -> MergeLayout:
    facts = _base_facts(base)
    updates: dict[str, Any] = {}
    notes: list[str] = []

    # Mismatches of the LoRA modules and of the replacements are collected and reported together.
    problems: list[str] = []
    merges, bias_merges = _lora_merges(facts, adapter, out_dtype, problems)
    replaces, vocab_size = _replacements(facts, adapter, out_dtype, problems)
    _raise_mismatches(problems, base, adapter)
    if vocab_size is not None:
        updates["vocab_size"] = vocab_size
        _check_vocab_ends(vocab_size, facts, adapter, merges, replaces)

    tensors = _in_base_order(base, out_dtype, merges, bias_merges, replaces)
    untied = _untied_head(facts, out_dtype, merges, replaces)
    if untied is not None:
        head, note = untied
        tensors.append(head)
        updates["tie_word_embeddings"] = False
        notes.append(note)
    input_weight = facts.input_weight
    base_vocab = base.info(input_weight).shape[0] if input_weight and base.has(input_weight) else None
    return MergeLayout(tensors, updates, notes, base_vocab)


def refuse_quantized_conv1d(base: BaseModel) -> None:
    """bitsandbytes stores a Conv1D weight (GPT-2) transposed to (out, in), unlike its float checkpoint (in, out);
    presenting it in the float layout is not built, so such a base is refused here, before the adapter is matched
    against its shapes (which would blame the adapter), rather than merged wrongly."""
    if base.quantization is None or base.config.get("model_type") in LINEAR_ARCHITECTURES:
        return  # all nn.Linear (checked against transformers by tests/test_layout.py): no need to build it
    from transformers import CONFIG_MAPPING

    if base.config.get("model_type") not in CONFIG_MAPPING:
        raise InputError(str(base.path / "config.json"), "is a quantized model of an architecture transformers "
                         "does not build, so its quantized layers cannot be told apart.",
                         "merge into the unquantized base model the adapter was trained from.")
    from exporter.parity.layerwise import skeleton

    if any(type(m).__name__ == "Conv1D" for m in skeleton(base.path).modules()):
        raise InputError(str(base.path / "config.json"), "is a quantized model with Conv1D layers (GPT-2 style), "
                         "which lora-export cannot dequantize yet.",
                         "merge into the unquantized base model the adapter was trained from.")
