"""Which initializers each HF weight becomes, and the external-data file they are appended to.

The traced graph consumes each weight through a few weight-only ops: a Linear is ``MatMul(x, Transpose(W))``, Gemma's
RMSNorm is ``1 + Cast(w)``, a tied embedding is both ``Gather(E)`` and ``MatMul(x, Transpose(E))``. Those ops are
folded here, per weight: the chain from the weight input to the first op that also reads activations becomes a tiny
ONNX model of its own, run with onnx's reference evaluator on the one tensor when it arrives, and each value where the
chain meets the rest of the graph becomes an initializer named after the weight and the ops, e.g.
``model.layers.0.mlp.up_proj.weight.transpose``. Only chains of one weight and constants through elementwise/layout
ops are folded; anything else stays in the graph (reading the weight as is).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

# Ops that are pure functions of their inputs, cheap on one tensor, and what the tracer puts between a weight and its
# first real use (transposes, Gemma's 1 + w, dtype casts, views).
_FOLDABLE = frozenset({"Transpose", "Cast", "Add", "Sub", "Mul", "Div", "Neg", "Identity", "Reshape", "Unsqueeze",
                       "Squeeze", "Flatten"})

# Tensors start at multiples of this in the data file, so ONNX Runtime can memory-map them (page size on Linux;
# 64 KiB would match Windows' allocation granularity at the cost of ~32 KiB of padding per tensor).
ALIGNMENT = 4096


@dataclass
class Fold:
    """How one HF weight becomes initializers: ``outputs`` are the initializer names; ``nodes`` (empty when the weight
    is used as is) compute them from the weight input named ``source``."""

    source: str
    outputs: list[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    describe: dict[str, str] = field(default_factory=dict)  # initializer -> transform, e.g. "Transpose(perm=[1, 0])"
    _evaluator: object | None = None

    def apply(self, weight: torch.Tensor, model: onnx.ModelProto) -> list[tuple[str, np.ndarray]]:
        """The initializers for one weight, each a C-contiguous array."""
        computed = [name for name in self.outputs if name != self.source]
        if not computed:
            return [(self.source, weight.contiguous().numpy())]
        results = self._layout_only(weight)
        if results is None:
            if self._evaluator is None:
                from onnx.reference import ReferenceEvaluator

                graph = helper.make_graph(
                    self.nodes, f"fold_{self.source}",
                    [helper.make_tensor_value_info(self.source, helper.np_dtype_to_tensor_dtype(
                        weight.numpy().dtype), None)],
                    [helper.make_value_info(name, onnx.TypeProto()) for name in computed])
                sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
                self._evaluator = ReferenceEvaluator(sub)
            arrays = self._evaluator.run(None, {self.source: weight.numpy()})  # type: ignore[attr-defined]
            results = {name: np.ascontiguousarray(a) for name, a in zip(computed, arrays)}
        source = weight.contiguous().numpy()
        return [(name, source if name == self.source else results[name]) for name in self.outputs]

    def _layout_only(self, weight: torch.Tensor) -> dict[str, np.ndarray] | None:
        """A chain of Transposes and Identities (every Linear's weight) run by torch, whose blocked copy is ~5x
        faster than numpy's strided one on a large matrix; None for any other chain (onnx's reference evaluator)."""
        if any(n.op_type not in ("Transpose", "Identity") for n in self.nodes):
            return None
        values = {self.source: weight}
        for node in self.nodes:
            value = values[node.input[0]]
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                value = value.permute(perm if perm is not None else list(range(value.dim()))[::-1])
            values[node.output[0]] = value
        return {name: values[name].contiguous().numpy() for name in self.outputs if name != self.source}


def _attrs(node: onnx.NodeProto, constants: dict[str, onnx.NodeProto]) -> str:
    parts = [f"{a.name}={helper.get_attribute_value(a)}" for a in node.attribute]
    for name in node.input:
        if name in constants:
            value = numpy_helper.to_array(constants[name].attribute[0].t)
            parts.append(str(value.tolist()) if value.size <= 4 else f"<{value.shape} constant>")
    return f"{node.op_type}({', '.join(parts)})"


def plan_folds(model: onnx.ModelProto, weights: list[str]) -> dict[str, Fold]:
    """One Fold per weight the graph reads; removes the folded nodes (and constants only they used) from ``model``
    and renames each folded value after its weight and ops, e.g. ``model.layers.0.mlp.up_proj.weight.transpose``
    (stable, readable names: they are what a TensorRT refit or a debugger sees)."""
    graph = model.graph
    constants = {o: n for n in graph.node if n.op_type == "Constant" for o in n.output}
    source = {w: w for w in weights}  # value -> the weight it is a function of
    producer: dict[str, onnx.NodeProto] = {}
    folded: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
            continue
        if not all(i in source or i in constants or i == "" for i in node.input):
            continue
        origins = {source[i] for i in node.input if i in source}
        if len(origins) != 1:
            continue
        (weight,) = origins
        folded[weight].append(node)
        for o in node.output:
            source[o], producer[o] = weight, node
    folded_ids = {id(n) for nodes in folded.values() for n in nodes}

    frontier: dict[str, list[str]] = defaultdict(list)  # weight -> values read by the unfolded graph
    for name in [i for n in graph.node if id(n) not in folded_ids for i in n.input]:
        if name in source and name not in frontier[source[name]]:
            frontier[source[name]].append(name)

    plans, renamed = {}, {}
    for weight in weights:
        if not frontier[weight]:
            continue  # read only by folded nodes whose results nobody reads: not a graph weight
        needed = _needed(frontier[weight], producer)
        nodes = [n for n in folded[weight] if any(o in needed for o in n.output)]
        plan = Fold(weight, [], _dedup([constants[i] for n in nodes for i in n.input if i in constants]) + nodes)
        for out in frontier[weight]:
            chain = _chain(out, producer, source)
            name = ".".join([weight] + [n.op_type.lower() for n in chain])
            while name in plan.outputs:  # two different chains of the same ops
                name += "_"
            if chain:  # the sub-model computes `name`; the main graph reads it instead of `out`
                plan.nodes.append(helper.make_node("Identity", [out], [name]))
                renamed[out] = name
            plan.outputs.append(name)
            plan.describe[name] = " -> ".join(_attrs(n, constants) for n in chain) or "as is"
        plans[weight] = plan

    keep = [n for n in graph.node if id(n) not in folded_ids]
    for node in keep:
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
    read = {i for n in keep for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in keep if n.op_type != "Constant" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    produced = {o for n in keep for o in n.output}
    value_info = [v for v in graph.value_info if v.name in produced]  # drop shapes of values folded away
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    return plans


def _needed(outputs: list[str], producer: dict[str, onnx.NodeProto]) -> set[str]:
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            stack.extend(producer[name].input)
    return needed


def _chain(value: str, producer: dict[str, onnx.NodeProto], source: dict[str, str]) -> list[onnx.NodeProto]:
    """The folded ops from the weight to ``value``, first op first."""
    chain = []
    while value in producer:
        node = producer[value]
        chain.append(node)
        value = next(i for i in node.input if i in source)
    return chain[::-1]


def _dedup(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    seen, out = set(), []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return out


class DataFile:
    """One external-data file, appended to tensor by tensor; it hands back the initializer that points at each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w+b")  # noqa: SIM115 - closed in close(); read back by read()
        self.offset = 0

    def append(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        pad = -self.offset % ALIGNMENT
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        self._file.write(memoryview(array.reshape(-1).view(np.uint8)))  # no bytes copy
        tensor = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(self.offset)),
                           ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.offset += array.nbytes
        return tensor

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The bytes an initializer appended earlier points at."""
        self._file.flush()
        info = {entry.key: entry.value for entry in tensor.external_data}
        raw = os.pread(self._file.fileno(), int(info["length"]), int(info["offset"]))
        return np.frombuffer(raw, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tensor.dims)

    def close(self, discard: bool = False) -> None:
        """Flush to disk and close; ``discard``: close only (the file is about to be removed, and on a full disk
        the flush would fail again and leave the descriptor open)."""
        if self._file.closed:
            return
        try:
            if not discard:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            try:
                self._file.close()
            except OSError:  # close flushes what is buffered: on a full disk that fails, and the fd is released
                if not discard:
                    raise
