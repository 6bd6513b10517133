"""ONNX writer: a causal LM's graph traced from its config (no real weights), weights streamed into one external-data
file, a genai_config.json for onnxruntime-genai, and an operator census. Imports nothing from ``exporter``."""

from converters.onnx.arch import ARCHITECTURES
from converters.onnx.census import non_standard_ops, operator_census
from converters.onnx.errors import OnnxExportError
from converters.onnx.genai import genai_config, write_genai_config
from converters.onnx.writer import DATA_FILE, MODEL_FILE, OnnxWriter

__all__ = ["ARCHITECTURES", "DATA_FILE", "MODEL_FILE", "OnnxExportError", "OnnxWriter", "genai_config",
           "non_standard_ops", "operator_census", "write_genai_config"]
