"""Operator census of an ONNX file: which (domain, op) pairs a runtime or TensorRT's parser must support."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

STANDARD_DOMAIN = "ai.onnx"


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop/Scan bodies
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _nodes(sub)


def operator_census(model_path: Path) -> dict[str, int]:
    """Counts keyed "domain::Op" ("ai.onnx" for the default domain), over the graph, subgraphs and local functions.
    Reads the graph only, never the external weights."""
    model = onnx.load(str(model_path), load_external_data=False)
    nodes = list(_nodes(model.graph)) + [n for f in model.functions for n in f.node]
    return dict(sorted(Counter(f"{n.domain or STANDARD_DOMAIN}::{n.op_type}" for n in nodes).items()))


def non_standard_ops(census: dict[str, int]) -> dict[str, int]:
    """The entries outside the standard ONNX domain (com.microsoft contrib ops and the like)."""
    return {key: count for key, count in census.items() if not key.startswith(STANDARD_DOMAIN + "::")}
