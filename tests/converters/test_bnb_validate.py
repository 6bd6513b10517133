"""validate(), the pre-flight check of a bitsandbytes int8 checkpoint (all of dequantize's checks, none of its work),
against bitsandbytes' own names for the int8 weight layouts: only row-major weights are loadable."""

from __future__ import annotations

import pytest
import torch

from converters.bnb import BnbFormatError, group_tensors, validate

pytest.importorskip("bitsandbytes")


def _int8_checkpoint(weight_format: int | None) -> dict[str, torch.Tensor]:
    tensors = {"m.weight": torch.zeros(4, 8, dtype=torch.int8), "m.SCB": torch.ones(4)}
    if weight_format is not None:
        tensors["m.weight_format"] = torch.tensor(weight_format, dtype=torch.uint8)
    return tensors


def test_validate_refuses_every_int8_layout_but_row_major_and_accepts_a_checkpoint_without_the_key():
    """bitsandbytes stores weight_format as its LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING code: "row" loads; col32,
    col_turing and col_ampere are refused naming the key and the layout; a checkpoint without weight_format (older
    bitsandbytes) is row-major and passes."""
    from bitsandbytes.utils import LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING as LAYOUTS

    for code, name in [(code, name) for name, code in LAYOUTS.items()] + [(None, "absent")]:
        tensors = _int8_checkpoint(code)
        [entry] = group_tensors(tensors)
        assert entry.kind == "int8"
        if name in ("row", "absent"):
            validate(entry, tensors.__getitem__)
            continue
        with pytest.raises(BnbFormatError, match=rf"is {code} \({name}\)") as e:
            validate(entry, tensors.__getitem__)
        assert e.value.key == "m.weight_format"
