"""Our torch GGML block quantizers are byte-identical to gguf-py's reference (a port of ggml-quants.c)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as reference
from gguf.constants import GGMLQuantizationType as QT

from converters.gguf.quants import encode_rows

# Warnings are errors for our writers' code; gguf-py's numpy reference (the oracle) warns on the F16 overflow and NaN
# edge cases these tests feed it on purpose.
pytestmark = [pytest.mark.filterwarnings("error"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf.quants")]


def quantize(tensor: torch.Tensor, qtype: QT, rows_per_chunk: int) -> np.ndarray:
    """The whole tensor through encode_rows, ``rows_per_chunk`` rows at a time (as the writer feeds it blocks)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return np.concatenate([encode_rows(rows[start:start + rows_per_chunk], qtype).numpy()
                           for start in range(0, rows.shape[0], rows_per_chunk)])


def awkward_tensor(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 2, rows).unsqueeze(1)
    t[0, :32] = 0  # an all-zero block (d = 0)
    t[1, :32] = 1.5  # all equal: min == max
    t[2, :32] = torch.tensor([-3.0, 3.0] * 16)  # |max| tie between signs: the first one wins
    t[3, 5] = 1e-30  # subnormal-scale values
    # values landing exactly on .5 after scaling exercise the rounding rule
    t[4, :32] = torch.arange(32, dtype=torch.float32) - 15.5
    return t


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.F16, QT.BF16])
@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_are_byte_identical_to_gguf_reference(qtype, seed):
    t = awkward_tensor(64, 256, seed)
    ours = quantize(t, qtype, rows_per_chunk=5)  # several chunks, one partial
    expected = reference.quantize(t.numpy(), qtype)
    assert ours.tobytes() == np.ascontiguousarray(expected).tobytes()


def with_float16_edges(t: torch.Tensor) -> torch.Tensor:
    """Values where a bf16 -> f16 cast must round, overflow or go subnormal exactly as the float32 path does."""
    t = t.clone()
    t[5, :8] = torch.tensor([65504.0, 65520.0, 70000.0, -1e6, 1e-5, 3e-8, 2.9e-8, -6.1e-5])
    return t


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.F16, QT.BF16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_quantize_like_their_float32_value(qtype, dtype):
    # bf16 <-> f16 casts are staged through a float32 buffer for speed: the bytes must be those of the float32 value.
    t = with_float16_edges(awkward_tensor(8, 64, 3)).to(dtype)
    ours = quantize(t, qtype, rows_per_chunk=3)
    assert ours.tobytes() == np.ascontiguousarray(reference.quantize(t.float().numpy(), qtype)).tobytes()


def test_rows_must_fit_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        encode_rows(torch.zeros(2, 40), QT.Q8_0)
    with pytest.raises(ValueError, match="multiple of 32"):
        encode_rows(torch.zeros(40), QT.Q8_0)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q5_1])
def test_a_one_dimensional_tensor_is_one_row(qtype):
    t = awkward_tensor(8, 128, 2)[4]  # a row whose scaled values land on .5
    assert encode_rows(t, qtype).numpy().tobytes() == np.ascontiguousarray(reference.quantize(t.numpy(), qtype)).tobytes()
