"""Details of the traced ONNX graph and of the writer that the end-to-end ONNX tests (ONNX Runtime against
transformers) cannot see, because the logits come out the same: which nodes become initializers, constant folding, the
no-cache graph carrying no cache updates, what the tracer logs, and the output folder's creation."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

pytest.importorskip("onnxruntime")

# 2 layers, 2 KV heads, head_dim 64 / 4 = 16
TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15,
            bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _weight_graph(node: onnx.NodeProto) -> onnx.ModelProto:
    """x @ f(transpose(w)), with ``node`` as f: w -> w.t -> (node) -> w.f -> MatMul(x, w.f)."""
    nodes = [helper.make_node("Transpose", ["w"], ["w.t"], perm=[1, 0]), node,
             helper.make_node("MatMul", ["x", "w.f"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    return helper.make_model(graph)


@pytest.mark.parametrize("node", [helper.make_node("Sin", ["w.t"], ["w.f"]),
                                  helper.make_node("Transpose", ["w.t"], ["w.f"], domain="com.example", perm=[1, 0])],
                         ids=["op-not-foldable", "foldable-op-in-another-domain"])
def test_only_standard_layout_ops_are_folded_into_a_weights_initializer(node):
    """plan_folds turns a weight's chain of standard-domain layout/arithmetic ops into initializers. A Sin (not a
    foldable op) or a Transpose of another operator domain (its meaning is that domain's, not ONNX's) reading the
    transposed weight stays in the graph: only the Transpose is folded, the initializer is w.transpose, and the
    graph keeps the node."""
    from converters.onnx.weights import plan_folds

    model = _weight_graph(node)
    folds = plan_folds(model, ["w"])
    assert list(folds) == ["w"]
    assert folds["w"].outputs == ["w.transpose"]
    assert [n.op_type for n in folds["w"].nodes if n.op_type != "Identity"] == ["Transpose"]
    kept = [n for n in model.graph.node if n.op_type == node.op_type and n.domain == node.domain
            and list(n.output) == ["w.f"]]
    assert kept and list(kept[0].input) == ["w.transpose"]
    # the initializer is the transposed weight, as numpy computes it
    weight = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    [(name, array)] = folds["w"].apply(weight, model)
    assert name == "w.transpose"
    np.testing.assert_array_equal(array, weight.numpy().T)


def _float_values(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name for v in values if v.type.tensor_type.elem_type in floats}


@pytest.mark.parametrize("kv_cache", [False, True], ids=["no-cache", "kv-cache"])
def test_the_graph_has_no_constant_subgraphs_left_and_no_cache_without_a_kv_cache(kv_cache):
    """Constant folding at export: every node whose inputs are all constants (rotary tables, mask constants) was
    computed once by the exporter, so none is left for ONNX Runtime to recompute on every call; ConstantOfShape is
    the one op torch.onnx keeps unfolded (its result is as large as its shape says). And the no-cache graph appends
    no key/value to a cache it does not have: no Concat copies a float tensor on its own (the one-input Concat a
    DynamicCache's first update traces to, once per key and value of every layer)."""
    from converters.onnx.trace import trace

    graph = trace(TINY, torch.float32, kv_cache=kv_cache).model
    constants = {o for n in graph.graph.node if n.op_type == "Constant" for o in n.output} | \
        {i.name for i in graph.graph.initializer}
    unfolded = [n.op_type for n in graph.graph.node if n.op_type not in ("Constant", "ConstantOfShape")
                and n.input and all(i in constants or i == "" for i in n.input)]
    assert not unfolded
    if kv_cache:
        return
    floats = _float_values(graph)
    copies = [n.name for n in graph.graph.node if n.op_type == "Concat" and len(n.input) == 1 and n.input[0] in floats]
    assert not copies


@pytest.mark.parametrize("kv_cache, logged", [(True, "2 cache layers of (kv_heads, head_dim) = (2, 16)"),
                                              (False, "0 cache layers of (kv_heads, head_dim) = (0, 0)")])
def test_the_tracer_logs_the_cache_geometry_it_traced(kv_cache, logged, caplog):
    """The debug line names the cache the graph has: the config's 2 layers of 2 KV heads of 64 / 4 = 16 values, or
    none at all for the no-cache graph."""
    from converters.onnx.trace import trace

    with caplog.at_level(logging.DEBUG, logger="converters.onnx.trace"):
        trace(TINY, torch.float32, kv_cache=kv_cache)
    assert any(logged in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_the_writer_creates_its_folder_and_missing_parents(tmp_path):
    """OnnxWriter's folder may lie under folders that do not exist yet (staging/onnx/fp32): it creates them all,
    and writes there."""
    from converters.onnx import OnnxWriter

    folder = tmp_path / "a" / "b" / "onnx"
    writer = OnnxWriter(folder, dict(TINY), kv_cache=False)
    assert folder.is_dir()
    for name in writer.wanted():
        shape = writer.expected_shape(name)
        writer.write(name, torch.full(shape, 0.01))
    path = writer.close()
    assert path.parent == folder and path.is_file()
    onnx.checker.check_model(str(path))
