"""The one base of every error a converter raises on purpose: bad input it found while reading or writing a format
(the message names the file, tensor or key). The pipeline catches this type alone; anything else is a bug."""

from __future__ import annotations


class ConverterError(ValueError):
    """A format cannot be read or written as asked. A ValueError, as the converters' errors always were."""
