"""The one error type of the ONNX writer."""

from __future__ import annotations

from converters.errors import ConverterError


class OnnxExportError(ConverterError):
    """The model cannot be written as the ONNX graph asked for; the message names the architecture, tensor or file."""
