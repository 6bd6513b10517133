"""OnnxWriter: a graph traced from the config, weights appended one tensor at a time, model.onnx written at close.

Files, all under ``folder``: ``model.onnx`` (graph only, a few hundred KB) and ``model.onnx.data`` (every weight, each
aligned to 4 KiB). Peak memory is the placeholder trace (no resident weights) and then a few tensors per write().
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from converters.onnx.arch import DTYPES, REFUSED_DTYPES
from converters.onnx.errors import OnnxExportError
from converters.onnx.trace import trace
from converters.onnx.weights import DataFile, Fold, plan_folds
from converters.tensor_stream import within

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclass
class Prepared:
    """One tensor ready to append: its initializers (name, contiguous array) in graph order."""

    hf_name: str
    graph_name: str
    values: list[tuple[str, np.ndarray]]


class OnnxWriter:
    """``wanted()`` lists the HF names to ``write()``; names the graph does not use are ignored; ``close()`` fails if
    any wanted name was never written. Calls out of order (write after close) raise."""

    def __init__(self, folder: Path, config: dict, *, dtype: str = "fp32", kv_cache: bool = True, opset: int = 18,
                 metadata: dict[str, str] | None = None, check_finite: bool = True) -> None:
        """``check_finite``: refuse a weight with NaN or Inf in the graph's dtype (fp16 overflows beyond ±65504)."""
        if dtype in REFUSED_DTYPES:
            raise OnnxExportError(f"dtype {dtype} refused: {REFUSED_DTYPES[dtype]}")
        if dtype not in DTYPES:
            raise OnnxExportError(f"dtype {dtype!r} unknown; choose one of {', '.join(DTYPES)}")
        self.folder = Path(folder)
        self.dtype = dtype
        self.metadata = dict(metadata or {})
        self.check_finite = check_finite
        self.torch_dtype = DTYPES[dtype]
        self._traced = trace(config, self.torch_dtype, kv_cache=kv_cache, opset=opset)
        self._folds: dict[str, Fold] = plan_folds(self._traced.model, list(self._traced.params))
        self._written: dict[str, str] = {}  # graph weight name -> the HF name it was written under
        self._first_output: dict[str, onnx.TensorProto] = {}  # graph weight name -> its first initializer
        self._initializers: list[onnx.TensorProto] = []
        self.folder.mkdir(parents=True, exist_ok=True)
        self._data: DataFile | None = DataFile(self.folder / DATA_FILE)
        logger.info("traced %s (%s, %s): %d weights -> %d initializers", config.get("model_type"), dtype,
                    "KV cache" if kv_cache else "no cache", len(self._folds),
                    sum(len(f.outputs) for f in self._folds.values()))

    def wanted(self) -> list[str]:
        """HF tensor names the graph needs, in graph order (tied aliases such as lm_head.weight are not listed)."""
        return list(self._folds)

    def expected_shape(self, hf_name: str) -> tuple[int, ...]:
        """The shape write() accepts for ``hf_name`` (as in the HF state dict, before any transform)."""
        return self._traced.params[self._traced.aliases.get(hf_name, hf_name)][0]

    def mapping(self) -> dict[str, dict[str, str]]:
        """HF name -> {initializer name: transform applied}, e.g. a q_proj weight -> {"<name>.transpose":
        "Transpose(perm=[1, 0])"}; "as is" when the graph reads the weight unchanged."""
        return {name: dict(fold.describe) for name, fold in self._folds.items()}

    def write(self, hf_name: str, tensor: torch.Tensor) -> None:
        """prepare() then commit(): one tensor, checked, transformed and appended to the data file."""
        prepared = self.prepare(hf_name, tensor)
        if prepared is not None:
            self.commit(prepared)

    def prepare(self, hf_name: str, tensor: torch.Tensor) -> Prepared | None:
        """The checks and the weight-only transforms (transposes, Gemma's 1 + w) of one tensor, without touching the
        data file: safe to call from several threads at once, so the work runs in parallel while commit() (which
        appends, in an order the caller chooses) stays serial. None: the graph does not use this tensor."""
        name = self._traced.aliases.get(hf_name, hf_name)
        fold = self._folds.get(name)
        if fold is None:
            logger.debug("ONNX graph does not use %s; skipped", hf_name)
            return None
        shape, dtype = self._traced.params[name]
        if tuple(tensor.shape) != shape:
            raise OnnxExportError(f"tensor {hf_name} is shaped {tuple(tensor.shape)}, the graph (built from "
                                  f"config.json) wants {shape}")
        if not tensor.is_floating_point():
            raise OnnxExportError(f"tensor {hf_name} is {tensor.dtype}; the ONNX writer takes float tensors")
        weight = tensor.detach().to("cpu", dtype)
        if self.check_finite and not within(weight, torch.finfo(weight.dtype).max):
            raise OnnxExportError(f"tensor {hf_name} has non-finite values as {self.dtype} (beyond fp16's ±65504?)")
        return Prepared(hf_name, name, fold.apply(weight, self._traced.model))

    def commit(self, prepared: Prepared) -> None:
        """Append what prepare() computed (not thread-safe: one caller at a time, in the order the file should have)."""
        if self._data is None:
            raise OnnxExportError(f"write({prepared.hf_name!r}) after close() or abort()")
        name, hf_name, values = prepared.graph_name, prepared.hf_name, prepared.values
        if self._written.get(name) == hf_name:
            raise OnnxExportError(f"tensor {hf_name} written twice")
        if name in self._written:  # the second of a tied pair (lm_head.weight and embed_tokens.weight both came)
            self._check_tied(hf_name, self._written[name], values[0][1])
            return
        for init_name, value in values:
            self._initializers.append(self._data.append(init_name, value))
        self._written[name] = hf_name
        self._first_output[name] = self._initializers[-len(values)]

    def _check_tied(self, hf_name: str, first: str, value: np.ndarray) -> None:
        """Ties come from the config: a tied alias that differs from its target (say a LoRA merged into lm_head only)
        would be silently lost, so it must equal what was written for the target. Costs one read-back."""
        assert self._data is not None
        stored = self._first_output[self._traced.aliases.get(hf_name, hf_name)]
        if not np.array_equal(self._data.read(stored), np.ascontiguousarray(value)):
            raise OnnxExportError(f"tensor {hf_name} differs from {first}, but config.json ties them "
                                  "(tie_word_embeddings); untie them in the config to export both")
        logger.debug("%s is tied to %s and equal to it; skipped", hf_name, first)

    def close(self) -> Path:
        if self._data is None:
            raise OnnxExportError("close() called twice or after abort()")
        missing = [name for name in self._folds if name not in self._written]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise OnnxExportError(f"{len(missing)} weights the ONNX graph needs were never written: {shown}")
        self._data.close()
        self._data = None
        model = self._traced.model
        graph = model.graph
        inputs = [v for v in graph.input if v.name not in self._traced.params]
        del graph.input[:]
        graph.input.extend(inputs)
        graph.initializer.extend(self._initializers)
        model.producer_name = "lora-export"
        for key, value in sorted(self.metadata.items()):
            model.metadata_props.add(key=key, value=str(value))
        path = self.folder / MODEL_FILE
        onnx.save_model(model, path)
        try:
            onnx.checker.check_model(str(path))  # by path: checks the external data references too
        except onnx.checker.ValidationError as e:
            raise OnnxExportError(f"{path} fails onnx.checker: {e}") from e
        logger.info("wrote %s (%d bytes) and %s (%d bytes)", path, path.stat().st_size, DATA_FILE,
                    (self.folder / DATA_FILE).stat().st_size)
        return path

    def abort(self) -> None:
        """Close and remove what this writer created."""
        if self._data is not None:
            self._data.close(discard=True)
            self._data = None
        for name in (MODEL_FILE, DATA_FILE):
            (self.folder / name).unlink(missing_ok=True)
