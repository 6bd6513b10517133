"""Bulk-packed metadata arrays are byte for byte what gguf-py's GGUFWriter packs one element at a time."""

from __future__ import annotations

import gguf
import pytest
from gguf.constants import GGUFValueType as VT

from converters.gguf.bulk_writer import BulkArrayGGUFWriter

# Warnings are errors: a writer that makes torch or numpy warn (an out= buffer resized, a cast that overflows, a file
# left open) is doing something it did not mean to. No third-party warning needed ignoring here.
pytestmark = pytest.mark.filterwarnings("error")

ARRAYS = {
    "strings": (["hello", "▁wörld", "", "<|im_end|>", "\n\t", "🦙"], None),
    "bytes tokens": ([b"a", b"\xe2\x96\x81b", b"", bytearray(b"\x00\xff")], None),
    "token types": ([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, 3, 1], None),
    "scores": ([-1000.0, 0.0, -1.5, 3.25e-8, float("inf")], None),
    "bools": ([True, False, True], None),
    "uint32 by sub_type": ([1, 2, 4_000_000_000], VT.UINT32),
    "int64 by sub_type": ([-(2**40), 5], VT.INT64),
    "float64 by sub_type": ([0.1, -2.5], VT.FLOAT64),
    "mixed int and float": ([1, 2.5], None),  # GGUFWriter refuses: so must we
    "nested": ([[1, 2], [3]], None),
}


@pytest.mark.parametrize("name", ARRAYS)
@pytest.mark.parametrize("add_vtype", [True, False])
def test_arrays_pack_like_gguf_writer(tmp_path, name, add_vtype):
    values, sub_type = ARRAYS[name]
    reference = gguf.GGUFWriter(None, "llama")
    ours = BulkArrayGGUFWriter(None, "llama")
    try:
        expected = reference._pack_val(values, VT.ARRAY, add_vtype, sub_type)
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)[:30]):
            ours._pack_val(values, VT.ARRAY, add_vtype, sub_type)
        return
    assert ours._pack_val(values, VT.ARRAY, add_vtype, sub_type) == expected
