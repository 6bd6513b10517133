"""Architecture facts for HF → GGUF, as data: which gguf architecture, which hyperparameter keys from which config
fields, and which tensor transforms llama.cpp expects.

Sources: gguf-py 0.19 (keys, tensor name maps) and llama.cpp's convert_hf_to_gguf / src/models (what the loader reads).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import torch
from gguf.constants import GGUFValueType as VT

from converters.errors import ConverterError


@dataclass(frozen=True)
class ArrayOf:
    """A metadata array and the type of its items. A named wrapper rather than a (VT.ARRAY, item) tuple: the key
    tables are tuples already, and ``ArrayOf(VT.BOOL)`` says what it is where a nested tuple would need reading."""

    item: VT


ValueType = VT | ArrayOf  # a metadata value's GGUF type: gguf-py's enum, so a misspelt type fails at import


class ArchError(ConverterError):
    """The model's architecture or configuration cannot be written as a GGUF llama.cpp runs correctly."""


_REQUIRED = object()


def _get(hp: dict[str, Any], *names: str, default: Any = _REQUIRED) -> Any:
    for name in names:
        if hp.get(name) is not None:
            return hp[name]
    if default is _REQUIRED:
        raise ArchError(f"config.json has none of {', '.join(names)}, which llama.cpp needs")
    return default


def rope_parameters(hp: dict[str, Any], layer_kind: str | None = None) -> dict[str, Any]:
    """Rope settings in one shape, whether the config uses transformers 5's rope_parameters (possibly per layer kind,
    as Gemma 3: full_attention / sliding_attention) or the older rope_theta + rope_scaling."""
    params = hp.get("rope_parameters")
    if isinstance(params, dict):
        if layer_kind and isinstance(params.get(layer_kind), dict):
            return params[layer_kind]
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            return params["full_attention"]
        return params
    legacy = dict(hp.get("rope_scaling") or {})
    legacy.setdefault("rope_type", legacy.get("type", "default"))
    if hp.get("rope_theta") is not None:
        legacy["rope_theta"] = hp["rope_theta"]
    return legacy


def head_dim(hp: dict[str, Any]) -> int:
    return int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


# Keys every supported architecture writes: (key under "{arch}.", type, config fields tried in order, default)
COMMON_KEYS: tuple[tuple[str, ValueType, tuple[str, ...], Any], ...] = (
    ("context_length", VT.UINT32, ("max_position_embeddings", "n_positions"), _REQUIRED),
    ("embedding_length", VT.UINT32, ("hidden_size", "n_embd"), _REQUIRED),
    ("block_count", VT.UINT32, ("num_hidden_layers", "n_layer"), _REQUIRED),
    ("feed_forward_length", VT.UINT32, ("intermediate_size",), _REQUIRED),
    ("attention.head_count", VT.UINT32, ("num_attention_heads",), _REQUIRED),
    ("attention.head_count_kv", VT.UINT32, ("num_key_value_heads", "num_attention_heads"), _REQUIRED),
    ("attention.layer_norm_rms_epsilon", VT.FLOAT32, ("rms_norm_eps",), _REQUIRED),
)

Key = tuple[str, ValueType, Any]  # (key under "{arch}.", type, value)


def _rope_scaling_keys(hp: dict[str, Any], rope: dict[str, Any]) -> list[Key]:
    kind = rope.get("rope_type") or "default"
    if kind == "default":
        return []
    if kind == "linear":
        return [("rope.scaling.type", VT.STRING, "linear"), ("rope.scaling.factor", VT.FLOAT32, float(rope["factor"]))]
    if kind == "yarn":
        keys = [("rope.scaling.type", VT.STRING, "yarn"), ("rope.scaling.factor", VT.FLOAT32, float(rope["factor"]))]
        original = rope.get("original_max_position_embeddings") or hp.get("original_max_position_embeddings")
        if original:
            keys.append(("rope.scaling.original_context_length", VT.UINT32, int(original)))
        return keys
    if kind == "llama3":
        return []  # expressed as the rope_freqs tensor instead (see llama3_rope_factors)
    raise ArchError(f"rope_type '{kind}' is not supported for GGUF yet (supported: default, linear, yarn, llama3)")


def llama3_rope_factors(hp: dict[str, Any]) -> torch.Tensor | None:
    """Llama 3.x frequency scaling as llama.cpp wants it: a [head_dim/2] F32 tensor of per-frequency divisors."""
    rope = rope_parameters(hp)
    if rope.get("rope_type") != "llama3":
        return None
    base, dim = float(rope.get("rope_theta", 10000.0)), head_dim(hp)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _llama_keys(hp: dict[str, Any]) -> list[Key]:
    rope = rope_parameters(hp)
    dim = head_dim(hp)
    return [("vocab_size", VT.UINT32, int(hp["vocab_size"])), ("rope.dimension_count", VT.UINT32, dim),
            ("attention.key_length", VT.UINT32, dim), ("attention.value_length", VT.UINT32, dim),
            ("rope.freq_base", VT.FLOAT32, float(rope.get("rope_theta", 10000.0))), *_rope_scaling_keys(hp, rope)]


def _qwen_keys(hp: dict[str, Any]) -> list[Key]:
    rope = rope_parameters(hp)
    dim = head_dim(hp)
    return [("attention.key_length", VT.UINT32, dim), ("attention.value_length", VT.UINT32, dim),
            ("rope.freq_base", VT.FLOAT32, float(rope.get("rope_theta", 10000.0))), *_rope_scaling_keys(hp, rope)]


def _check_query_scale(hp: dict[str, Any]) -> None:
    # llama.cpp ignores query_pre_attn_scalar: it uses head_dim, or n_embd/n_head for the 27B shapes (46 layers for
    # Gemma 2, 62 for Gemma 3). Any other value would silently change every attention score.
    scalar = hp.get("query_pre_attn_scalar")
    large = hp["num_hidden_layers"] in (46, 62)
    expected = hp["hidden_size"] // hp["num_attention_heads"] if large else head_dim(hp)
    if scalar is not None and int(scalar) != expected:
        raise ArchError(f"query_pre_attn_scalar={scalar}, but llama.cpp scales attention by {expected} for this "
                        "shape; the GGUF would not behave like the model")


def _gemma2_keys(hp: dict[str, Any]) -> list[Key]:
    _check_query_scale(hp)
    dim = head_dim(hp)
    return [("attention.key_length", VT.UINT32, dim), ("attention.value_length", VT.UINT32, dim),
            ("rope.freq_base", VT.FLOAT32, float(rope_parameters(hp).get("rope_theta", 10000.0))),
            ("attn_logit_softcapping", VT.FLOAT32, float(_get(hp, "attn_logit_softcapping"))),
            ("final_logit_softcapping", VT.FLOAT32, float(_get(hp, "final_logit_softcapping"))),
            ("attention.sliding_window", VT.UINT32, int(_get(hp, "sliding_window")))]


def _gemma3_keys(hp: dict[str, Any]) -> list[Key]:
    _check_query_scale(hp)
    if hp.get("attn_logit_softcapping"):
        raise ArchError("Gemma 3 with attn_logit_softcapping is not something llama.cpp implements")
    dim = head_dim(hp)
    full, local = rope_parameters(hp, "full_attention"), rope_parameters(hp, "sliding_attention")
    keys: list[Key] = [
        ("attention.key_length", VT.UINT32, dim), ("attention.value_length", VT.UINT32, dim),
        ("rope.freq_base", VT.FLOAT32, float(full.get("rope_theta", 1_000_000.0))),
        ("rope.freq_base_swa", VT.FLOAT32, float(local.get("rope_theta", hp.get("rope_local_base_freq", 10000.0)))),
        ("attention.sliding_window", VT.UINT32, int(_get(hp, "sliding_window"))), *_rope_scaling_keys(hp, full),
    ]
    if hp.get("final_logit_softcapping"):
        keys.append(("final_logit_softcapping", VT.FLOAT32, float(hp["final_logit_softcapping"])))
    if hp.get("layer_types"):  # exact per-layer pattern (true = sliding), read by llama.cpp ≥ 2025-09
        keys.append(("attention.sliding_window_pattern", ArrayOf(VT.BOOL),
                     [kind == "sliding_attention" for kind in hp["layer_types"]]))
    return keys


def _phi3_keys(hp: dict[str, Any]) -> list[Key]:
    rope = rope_parameters(hp)
    if rope.get("rope_type") not in (None, "default"):
        raise ArchError(f"Phi-3 rope_type '{rope.get('rope_type')}' (LongRoPE) is not supported for GGUF yet")
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    return [("rope.scaling.original_context_length", VT.UINT32,
             int(_get(hp, "original_max_position_embeddings", "max_position_embeddings"))),
            ("rope.dimension_count", VT.UINT32, int(hp.get("partial_rotary_factor", 1.0) * n_embd) // n_head),
            ("rope.freq_base", VT.FLOAT32, float(rope.get("rope_theta", 10000.0))),
            ("attention.sliding_window", VT.UINT32, int(hp.get("sliding_window") or 0))]


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: gguf.MODEL_ARCH
    extra_keys: Callable[[dict[str, Any]], list[Key]]
    permute_qk: bool = False  # llama.cpp's llama rope rotates adjacent pairs; HF's rotate_half pairs halves
    norm_shift: bool = False  # Gemma's RMSNorm computes x·(1 + w); llama.cpp multiplies by the stored w
    has_output: bool = True  # Gemma 2 in llama.cpp has no output tensor (always tied); writing one fails the load

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, _llama_keys, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, _llama_keys, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, _qwen_keys),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, _qwen_keys),
    "Gemma2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA2, _gemma2_keys, norm_shift=True, has_output=False),
    "Gemma3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA3, _gemma3_keys, norm_shift=True),
    "Phi3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.PHI3, _phi3_keys),
}

# Tensors that exist in HF checkpoints but not in llama.cpp's graph.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


# config.json's model_type for each, for configs that leave out `architectures` (transformers loads those too).
MODEL_TYPES: dict[str, str] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                               "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                               "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def arch_for(config: dict[str, Any]) -> ArchSpec:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and config.get("model_type") in MODEL_TYPES:
        return ARCHITECTURES[MODEL_TYPES[config["model_type"]]]
    described = names or f"model_type '{config.get('model_type')}' (no architectures in config.json)"
    raise ArchError(f"architecture {described} is not supported for GGUF export; supported: "
                    f"{', '.join(sorted(ARCHITECTURES))}")


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The config with text_config folded into the root, as llama.cpp's converter sees it."""
    hp = dict(config)
    if isinstance(config.get("text_config"), dict):
        hp.update(config["text_config"])
    return hp


def metadata_keys(spec: ArchSpec, hp: dict[str, Any]) -> list[Key]:
    keys: list[Key] = [(key, kind, _get(hp, *fields, default=default)) for key, kind, fields, default in COMMON_KEYS]
    return keys + spec.extra_keys(hp)


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's per-head [first half | second half] rotary layout → llama.cpp's interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_heads(spec: ArchSpec, hp: dict[str, Any], hf_name: str) -> int | None:
    """How many heads' rows llama.cpp's rotary layout permutes in this tensor (Q or K of llama-style models), else
    None. The permutation stays inside each head, so any block of whole heads can be permuted on its own."""
    if spec.permute_qk and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return int(hp["num_attention_heads"])
    if spec.permute_qk and hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return int(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    return None


def transform(spec: ArchSpec, hp: dict[str, Any], hf_name: str, rows: torch.Tensor,
              total_rows: int | None = None) -> torch.Tensor:
    """The tensor as llama.cpp expects it, or the same for a block of its leading rows (``total_rows``: the whole
    tensor's) that starts and ends on a head boundary. Permutations keep the dtype; the norm shift is in float32."""
    heads = rope_heads(spec, hp, hf_name)
    if heads is not None:
        return permute_rows(rows, heads * rows.shape[0] // (total_rows or rows.shape[0]))
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        return rows.to(torch.float32) + 1.0
    return rows


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_layers)  # builds every name of every layer: 5 ms, once per model


def gguf_tensor_name(spec: ArchSpec, hp: dict[str, Any], hf_name: str) -> str | None:
    """The llama.cpp name, or None for tensors llama.cpp does not use. Raises for tensors it cannot place."""
    if hf_name.endswith(SKIPPED_SUFFIXES):
        return None
    if hf_name.startswith("lm_head.") and not spec.has_output:
        return None
    name_map = _tensor_name_map(spec.gguf_arch, int(hp["num_hidden_layers"]))
    name = hf_name[len("language_model."):] if hf_name.startswith("language_model.") else hf_name
    mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ArchError(f"tensor '{hf_name}' has no place in llama.cpp's {spec.name} graph")
    return mapped
