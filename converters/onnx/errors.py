"""The one error type of the ONNX writer."""

from __future__ import annotations


class OnnxExportError(ValueError):
    """The model cannot be written as the ONNX graph asked for; the message names the architecture, tensor or file."""
