"""Trace a transformers causal LM into an ONNX graph without its real weights.

How: the model is built with its parameters on the meta device (buffers such as rotary ``inv_freq`` or Gemma's
``embed_scale`` are computed from the config, as usual and small). The weights enter the trace as explicit *inputs* of
a wrapper, which swaps them into the model's modules for the forward: the TorchScript exporter then names them after
the HF state-dict names and never treats them as constants. The placeholder tensors live on never-written private
anonymous mappings; Linux backs reads of those with the shared zero page, so tracing a model of any size costs a few
MB plus one weight's worth of transient matmul scratch.

What did not work (torch 2.13, transformers 5.24):
- Meta tensors: as weights beside real inputs, kernels refuse the device mix ("Tensor on device meta is not on the
  expected device cpu"); with meta inputs too, transformers' mask/cache code calls ``.item()``. The dynamo exporter
  (which could take fake tensors) fails on the DynamicCache wrapper.
- Parameters left as module parameters with ``export_params=False``: the exporter's ONNX shape inference computes
  constant values for weight-only subgraphs (``Transpose(W)`` of every Linear), which writes a copy of every weight:
  peak RSS rose by ~1x the weights' bytes. Its initializer de-duplication also merged distinct (all-zero) weights, and
  its constant folding renamed transposed weights to anonymous ``onnx::MatMul_N`` inputs.
- ``torch.func.functional_call``: refuses to run under the JIT tracer; hence the hand-made swap.
- ``mmap.mmap(-1, n)`` without flags is MAP_SHARED: its read faults allocate real shmem pages.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import mmap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn

from converters.onnx.arch import (ATTENTION_MASK, INPUT_IDS, LOGITS, PAST_KEY, PAST_VALUE, POSITION_IDS, PRESENT_KEY,
                                  PRESENT_VALUE, REFUSED)
from converters.onnx.errors import OnnxExportError

logger = logging.getLogger(__name__)

# Trace example: batch 2 (batch 1 invites specialisations), a left-padded mask (so no "all ones" shortcut is traced)
# and a non-empty past (an empty one takes DynamicLayer's "first update" branch instead of the concat).
_BATCH, _SEQ, _PAST = 2, 3, 2


@dataclass
class TracedGraph:
    model: onnx.ModelProto  # weights are graph inputs named by their HF names; buffers are baked in as constants
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]  # HF name -> (shape, dtype), as the graph wants them
    aliases: dict[str, str]  # tied HF name -> the name the graph uses (e.g. lm_head.weight -> embed_tokens.weight)
    input_names: list[str] = field(default_factory=list)  # the runtime inputs (ids, mask, positions, the past)


def hf_config(config: dict):
    """A transformers config object from a config.json dict (never remote code)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in REFUSED:
        raise OnnxExportError(f"architecture {model_type}: {REFUSED[model_type]}")
    if model_type not in CONFIG_MAPPING:
        raise OnnxExportError(f"architecture {model_type!r} is unknown to transformers, so it cannot be traced "
                              "(remote code is never run)")
    return CONFIG_MAPPING[model_type].from_dict(dict(config))


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter registered while this is active lands on the meta device; buffers stay real (as accelerate's
    init_empty_weights(include_buffers=False)). It patches nn.Module for the duration: not thread-safe."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is already ours: keep it, ties are by identity
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _untouched(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor on its own never-written anonymous mapping: reads see zeros and cost no resident memory."""
    nbytes = shape.numel() * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # MAP_PRIVATE: Python defaults to MAP_SHARED, whose read faults allocate real (shmem) pages.
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied parameter names -> the first name of the same parameter (e.g. lm_head.weight -> embed_tokens.weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


@contextlib.contextmanager
def _swapped(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Put ``weights`` (HF name -> tensor, tied names included) in place of the model's (meta) parameters."""
    saved = []
    for name, tensor in weights.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        saved.append((module, attr, module._parameters[attr]))
        module._parameters[attr] = tensor  # a plain tensor: the tracer records it as the graph input it came from
    try:
        yield
    finally:
        for module, attr, param in reversed(saved):
            module._parameters[attr] = param


class _Traced(nn.Module):
    """The HF model, not registered as a submodule (its meta parameters must not enter the trace as constants); its
    weights come in as the trailing forward arguments, in ``names`` order."""

    def __init__(self, model: nn.Module, names: list[str], aliases: dict[str, str]) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)
        self.names, self.aliases = names, aliases

    def run(self, weights: tuple[torch.Tensor, ...], **kwargs):
        by_name = dict(zip(self.names, weights))
        by_name |= {alias: by_name[target] for alias, target in self.aliases.items()}
        with _swapped(self.model, by_name):
            return self.model(**kwargs)


class _WithCache(_Traced):
    """Flat past_key_values.N.key/value inputs -> a DynamicCache; the updated cache -> flat present.N outputs.

    The cache is built without the config, so every layer is a full DynamicLayer: sliding-window layers (Gemma) keep
    the whole past and the attention mask applies the window. That keeps one I/O shape for all layers, the layout
    onnxruntime-genai expects with past_present_share_buffer false."""

    def __init__(self, model: nn.Module, names: list[str], aliases: dict[str, str], layers: int) -> None:
        super().__init__(model, names, aliases)
        self.layers = layers
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        past, weights = rest[:2 * self.layers], rest[2 * self.layers:]
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.run(weights, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, **{self.cache_kwarg: cache})
        # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40); accept both.
        returned = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if not isinstance(returned, DynamicCache):
            raise OnnxExportError(f"it returned {type(returned).__name__} as its cache, not the DynamicCache of "
                                  "key/value tensors the graph's past/present I/O is made of")
        layers = returned.layers
        return (out.logits, *(t for layer in layers for t in (layer.keys, layer.values)))


class _NoCache(_Traced):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *weights: torch.Tensor) -> torch.Tensor:
        return self.run(weights, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).logits


def _cache_geometry(probe: _WithCache, weights: list[torch.Tensor], dtype: torch.dtype,
                    arch: str) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim), read from the cache a forward from an empty past returns: the model's own answer,
    whatever its config calls them (num_key_value_heads, num_kv_heads, multi-query...)."""
    ids = torch.ones(_BATCH, _SEQ, dtype=torch.long)
    try:
        with torch.no_grad():
            presents = probe(ids, torch.ones_like(ids), torch.arange(_SEQ).expand(_BATCH, -1), *weights)[1:]
    except OnnxExportError as e:
        raise OnnxExportError(f"architecture {arch} cannot be exported: {e}") from e
    except Exception as e:  # transformers raises anything for a model that is not a KV-cache transformer
        raise OnnxExportError(f"architecture {arch} cannot be exported: a forward with a DynamicCache of key/value "
                              f"tensors (the graph's past/present I/O) failed with {type(e).__name__}: {e}") from e
    shapes = {tuple(t.shape) for t in presents}
    if not presents or len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[::2] != (_BATCH, _SEQ):
        raise OnnxExportError(f"architecture {arch}: its cache tensors are shaped {sorted(shapes)}, not one "
                              "(batch, kv_heads, seq, head_dim) shape for every layer; the graph's past/present I/O "
                              "needs that layout")
    if any(t.dtype != dtype for t in presents):
        raise OnnxExportError(f"architecture {arch}: its cache is not {dtype}")
    _, kv_heads, _, head_dim = next(iter(shapes))
    return len(presents) // 2, kv_heads, head_dim


def trace(config: dict, dtype: torch.dtype, *, kv_cache: bool = True, opset: int = 18) -> TracedGraph:
    """Export the graph of ``config``'s causal LM with placeholder weights. Raises OnnxExportError."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(config)
    arch = cfg.model_type
    try:
        # Built in float32 whatever config.json's dtype says: buffers and constants computed at construction (Gemma's
        # embed_scale √hidden, rotary tables) would otherwise be rounded to that dtype and traced as such (a bf16
        # config made √640 = 25.298 into 25.25). The weights' dtype is the graph's, set below by the placeholders.
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", trust_remote_code=False,
                                                     dtype=torch.float32)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise OnnxExportError(f"architecture {arch}: transformers builds no causal LM from this config ({e})") from e
    model.eval()
    aliases = _aliases(model)
    params = {name: (tuple(p.shape), dtype) for name, p in model.named_parameters()}  # tied ones once
    weights = [_untouched(torch.Size(shape), dtype) for shape, _ in params.values()]

    ids = torch.ones(_BATCH, _SEQ, dtype=torch.long)
    if kv_cache:
        probe = _WithCache(model, list(params), aliases, 0)
        layers, kv_heads, head_dim = _cache_geometry(probe, weights, dtype, arch)
        mask = torch.ones(_BATCH, _PAST + _SEQ, dtype=torch.long)
        mask[0, 0] = 0
        positions = torch.arange(_PAST, _PAST + _SEQ).expand(_BATCH, -1)
        past = [torch.zeros(_BATCH, kv_heads, _PAST, head_dim, dtype=dtype) for _ in range(2 * layers)]
        wrapper: _Traced = _WithCache(model, list(params), aliases, layers)
        inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
        inputs += [name % i for i in range(layers) for name in (PAST_KEY, PAST_VALUE)]
        outputs = [LOGITS] + [name % i for i in range(layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    else:
        layers = kv_heads = head_dim = 0
        mask, positions, past = torch.ones(_BATCH, _SEQ, dtype=torch.long), torch.arange(_SEQ).expand(_BATCH, -1), []
        wrapper = _NoCache(model, list(params), aliases)
        inputs, outputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS], [LOGITS]
    args = (ids, mask, positions, *past, *weights)
    axes = {INPUT_IDS: {0: "batch_size", 1: "sequence_length"}, POSITION_IDS: {0: "batch_size", 1: "sequence_length"},
            ATTENTION_MASK: {0: "batch_size", 1: "total_sequence_length"},
            LOGITS: {0: "batch_size", 1: "sequence_length"}}
    axes |= {name: {0: "batch_size", 2: "past_sequence_length"} for name in inputs[3:]}
    axes |= {name: {0: "batch_size", 2: "total_sequence_length"} for name in outputs[1:]}

    try:
        f = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape-only branches and the exporter's deprecation
            # Constant folding is safe here: weights are graph inputs, so it folds only config-derived subgraphs
            # (rotary tables, mask constants), never a weight.
            torch.onnx.export(wrapper, args, f, input_names=inputs + list(params), output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    except OnnxExportError as e:
        raise OnnxExportError(f"architecture {arch} cannot be exported: {e}") from e
    except Exception as e:  # the tracer and exporter raise anything from RuntimeError to AttributeError
        raise OnnxExportError(f"architecture {arch} cannot be exported: tracing failed with "
                              f"{type(e).__name__}: {e}") from e
    del wrapper, args, weights  # unmaps the placeholder pages

    traced = TracedGraph(onnx.load_from_string(f.getvalue()), {}, {}, inputs)
    _keep_used_inputs(traced, params, aliases, arch)
    logger.debug("traced %s: %d weights, %d cache layers of (kv_heads, head_dim) = (%d, %d), graph %d bytes", arch,
                 len(traced.params), layers, kv_heads, head_dim, len(f.getvalue()))
    return traced


def _keep_used_inputs(traced: TracedGraph, params: dict, aliases: dict[str, str], arch: str) -> None:
    """Record the weights the graph reads; drop weight inputs nobody reads."""
    graph = traced.model.graph
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    keep = [v for v in graph.input if v.name in traced.input_names or v.name in used]
    missing = set(traced.input_names) - {v.name for v in keep}
    if missing:
        raise OnnxExportError(f"architecture {arch}: the traced graph lost its inputs {sorted(missing)} (the model "
                              "ignores them)")
    del graph.input[:]
    graph.input.extend(keep)
    traced.params.update({v.name: params[v.name] for v in keep if v.name in params})
    traced.aliases.update({a: t for a, t in aliases.items() if t in traced.params})
