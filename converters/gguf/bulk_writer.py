"""gguf-py's GGUFWriter with metadata arrays packed in bulk.

GGUFWriter packs an array one Python call per element (~4 µs each): a 128K-token vocabulary with its token types and
280K merges costs seconds, more than converting the weights of a small model. Typed arrays are packed here in one
join or one numpy call, byte for byte what GGUFWriter writes (tested against it); anything else goes to GGUFWriter.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np
from gguf.constants import GGUFEndian, GGUFValueType as VT

_NUMPY_LAYOUT: dict[VT, str] = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
    VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT32: "<f4", VT.FLOAT64: "<f8", VT.BOOL: "?",
}


def _packed_array(values: Sequence[Any], item_type: VT) -> bytes | None:
    """The array's items packed as GGUFWriter would, or None where only GGUFWriter's own path is sure to agree."""
    # GGUFWriter's type of every item, asked once per distinct Python type (per item it costs 0.5 s on 800k items).
    kinds = set(map(type, values))
    if len(kinds) > 3 or {VT.get_type(next(v for v in values if type(v) is kind)) for kind in kinds} != {item_type}:
        return None  # mixed or unusual items: GGUFWriter's rules (and its errors) apply
    if item_type == VT.STRING:
        encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        return b"".join(struct.pack("<Q", len(e)) + e for e in encoded)
    if item_type in _NUMPY_LAYOUT:
        return np.asarray(values, dtype=_NUMPY_LAYOUT[item_type]).tobytes()
    return None


class BulkArrayGGUFWriter(gguf.GGUFWriter):
    def _pack_val(self, val: Any, vtype: VT, add_vtype: bool, sub_type: VT | None = None) -> bytes:
        if vtype == VT.ARRAY and self.endianess == GGUFEndian.LITTLE and isinstance(val, (list, tuple)) and val:
            item_type = sub_type if sub_type is not None else VT.get_type(val[0])
            body = _packed_array(val, item_type)
            if body is not None:
                prefix = struct.pack("<I", vtype) if add_vtype else b""
                return prefix + struct.pack("<IQ", item_type, len(val)) + body
        return super()._pack_val(val, vtype, add_vtype, sub_type)
