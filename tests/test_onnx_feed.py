"""The inputs the ONNX format's parity runner feeds a graph, against the graph's own declared shapes: every input
dimension named by one symbol (batch_size, total_sequence_length...) gets one value across the feed, as the ONNX
spec requires of a symbolic dimension."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")


def _session(tmp_path, dtype=TensorProto.FLOAT):
    """The genai-style inputs of a 1-layer KV-cache graph (2 KV heads of 4 values), present = Concat(past, ·)."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    inputs += [helper.make_tensor_value_info(f"past_key_values.0.{kv}", dtype,
                                             ["batch_size", 2, "past_sequence_length", 4]) for kv in ("key", "value")]
    outputs = [helper.make_tensor_value_info(f"present.0.{kv}", dtype, ["batch_size", 2, "total_sequence_length", 4])
               for kv in ("key", "value")]
    nodes = [helper.make_node("Identity", [f"past_key_values.0.{kv}"], [f"present.0.{kv}"]) for kv in ("key", "value")]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    path.write_bytes(model.SerializeToString())
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype, np_dtype", [(TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)])
def test_a_prefill_feeds_an_empty_past_of_the_prompts_batch(tmp_path, dtype, np_dtype):
    """A prefill of 3 tokens: input_ids (1, 3), attention_mask (1, 3), position_ids 0..2, and each past input empty
    in the graph's dtype, with the graph's 2 heads of 4 values and the prompt's batch of 1."""
    from exporter.formats.onnx import _feed

    session = _session(tmp_path, dtype)
    feed = _feed(session, [5, 6, 7], None, 3)
    assert set(feed) == {i.name for i in session.get_inputs()}
    np.testing.assert_array_equal(feed["input_ids"], [[5, 6, 7]])
    np.testing.assert_array_equal(feed["attention_mask"], [[1, 1, 1]])
    np.testing.assert_array_equal(feed["position_ids"], [[0, 1, 2]])
    symbols: dict[str, set[int]] = {}
    for i in session.get_inputs():
        assert feed[i.name].ndim == len(i.shape)
        for declared, actual in zip(i.shape, feed[i.name].shape):
            if isinstance(declared, str):
                symbols.setdefault(declared, set()).add(actual)
            else:
                assert declared == actual, i.name
    assert symbols["batch_size"] == {1} and symbols["past_sequence_length"] == {0}
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        assert feed[name].dtype == np_dtype and feed[name].shape == (1, 2, 0, 4)
    present = session.run(None, feed)
    assert all(p.shape == (1, 2, 0, 4) for p in present)
