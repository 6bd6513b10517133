"""The merge's arithmetic on its own, against values computed here in float64: several row blocks with a partial last
one (the models in the other tests fit in one block), the ‖ΔW‖/‖W‖ figure for a change smaller than 1, the one reused
block buffer that keeps memory at a block, and the float16 range check at its exact edges."""

from __future__ import annotations

import pytest
import torch

from exporter.errors import NonFiniteError
from exporter.merge_math import LoraMerge, cast_rows


def _pair(out_features: int = 10, in_features: int = 6, r: int = 2, delta: float = 1e-3):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(out_features, in_features, generator=gen)
    a = torch.randn(r, in_features, generator=gen)
    b = delta * torch.randn(out_features, r, generator=gen)
    return w, a, b


@pytest.mark.parametrize("rows_per_block", [3, 4, 10, 64])
def test_blocks_are_w_plus_scaled_b_at_a(rows_per_block):
    w, a, b = _pair()
    scale = 0.75
    expected = w.double() + scale * (b.double() @ a.double())
    merge = LoraMerge(w, a, b, scale, name="w")
    blocks = [(start, stop, rows.clone()) for start, stop, rows in merge.rows(rows_per_block)]
    bounds = list(range(0, 10, rows_per_block)) + [10]
    assert [(s, e) for s, e, _ in blocks] == list(zip(bounds[:-1], bounds[1:]))
    merged = torch.cat([rows for _, _, rows in blocks])
    assert torch.allclose(merged.double(), expected, rtol=0, atol=1e-6)
    # The relative change, from float64: small here (‖ΔW‖ ≈ 3e-3), where a clamp or a wrong norm would show.
    delta = expected - w.double()
    assert merge.relative_change == pytest.approx(float(delta.norm() / w.double().norm()), rel=1e-5)
    assert float(delta.norm()) < 1


def test_fan_in_fan_out_and_embedding_blocks_are_the_transposed_product():
    """GPT-2's Conv1D stores W as (in, out) and an embedding as (vocab, dim); both take ΔW = (B @ A)ᵀ."""
    gen = torch.Generator().manual_seed(4)
    stored = torch.randn(10, 6, generator=gen)
    a, b = torch.randn(2, 10, generator=gen), torch.randn(6, 2, generator=gen)
    expected = stored.double() + 2.0 * (b.double() @ a.double()).T
    for variant in ({"fan_in_fan_out": True}, {"embedding": True}):
        merged = torch.cat([rows.clone() for _, _, rows in LoraMerge(stored, a, b, 2.0, name="c", **variant).rows(4)])
        assert torch.allclose(merged.double(), expected, rtol=0, atol=1e-5), variant


def test_blocks_on_the_cpu_reuse_one_buffer():
    """Memory stays at one block whatever the tensor's size: every block is the same buffer, rewritten."""
    w, a, b = _pair(out_features=40)
    pointers = {rows.data_ptr() for _, _, rows in LoraMerge(w, a, b, 1.0, name="w").rows(8)}
    assert len(pointers) == 1


def test_cast_to_float16_at_the_edges_of_its_range():
    dst = torch.empty(2, dtype=torch.float16)
    cast_rows(dst, torch.tensor([65504.0, -65504.0]), "edge")  # the largest finite float16 values: kept
    assert dst.tolist() == [65504.0, -65504.0]
    for beyond in (65520.0, -65520.0):  # round to ±Inf in float16
        with pytest.raises(NonFiniteError, match="beyond what torch.float16 holds"):
            cast_rows(dst, torch.tensor([1.0, beyond]), "edge")
    cast_rows(dst, torch.tensor([1.0, 65520.0]), "edge", check_finite=False)  # the user asked for the Inf
    assert dst[1].item() == float("inf")
    wide = torch.empty(2, dtype=torch.float32)
    cast_rows(wide, torch.tensor([3e38, float("inf")]), "edge")  # float32 to float32: nothing to overflow
    assert wide[1].item() == float("inf")


@pytest.mark.parametrize("weight_scale", [1.0, 1e-2])  # ‖W‖ above and below 1
def test_relative_change_is_the_norm_ratio_at_any_scale(weight_scale):
    w, a, b = _pair(delta=0.1)
    w = w * weight_scale
    merge = LoraMerge(w, a, b, 1.5, name="w")
    for _ in merge.rows(4):
        pass
    delta = 1.5 * (b.double() @ a.double())
    assert merge.relative_change == pytest.approx(float(delta.norm() / w.double().norm()), rel=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_product_that_overflows_float32_is_refused(sign):
    """A and B finite, their product beyond float32: +Inf (or -Inf) alone in a block, no NaN beside it."""
    w = torch.zeros(6, 4)
    a = torch.full((1, 4), 1e20)
    b = torch.zeros(6, 1)
    b[4, 0] = sign * 1e20
    with pytest.raises(NonFiniteError, match="the merged tensor holds NaN or Inf"):
        for _ in LoraMerge(w, a, b, 1.0, name="w").rows(3):
            pass


@pytest.mark.parametrize("shape, weight_scale", [((10, 6), 1.0), ((6, 10), 1.0), ((10, 6), 1e-2)])  # ‖W‖ < 1 last
def test_dora_blocks_rescale_each_row_to_its_magnitude(shape, weight_scale):
    """DoRA (PEFT's formula): W' = m / ‖W + s·B@A‖_row ⊙ (W + s·B@A), yielded in blocks like the plain merge."""
    out_features, in_features = shape
    w, a, b = _pair(out_features, in_features, delta=0.3)
    w = w * weight_scale
    magnitude = torch.rand(out_features, generator=torch.Generator().manual_seed(5)) + 0.5
    combined = w.double() + 0.5 * (b.double() @ a.double())
    expected = magnitude.double().unsqueeze(1) * combined / combined.norm(dim=1, keepdim=True)
    merge = LoraMerge(w, a, b, 0.5, name="w", magnitude=magnitude)
    blocks = [(start, stop, rows.clone()) for start, stop, rows in merge.rows(4)]
    bounds = list(range(0, out_features, 4)) + [out_features]
    assert [(s, e) for s, e, _ in blocks] == list(zip(bounds[:-1], bounds[1:]))
    assert torch.allclose(torch.cat([r for _, _, r in blocks]).double(), expected, rtol=0, atol=1e-5)
    assert merge.relative_change == pytest.approx(float((expected - w.double()).norm() / w.double().norm()), rel=1e-4)


def test_relative_change_of_a_zero_weight_is_the_change_itself():
    """‖W‖ = 0 (a layer initialised to zero): the ratio is undefined, so the figure is ‖ΔW‖, in either path."""
    _, a, b = _pair(delta=0.1)
    zero = torch.zeros(10, 6)
    expected = float((0.5 * (b.double() @ a.double())).norm())
    plain = LoraMerge(zero, a, b, 0.5, name="w")
    for _ in plain.rows(4):
        pass
    assert plain.relative_change == pytest.approx(expected, rel=1e-5)
    dora = LoraMerge(zero, a, b, 0.5, name="w", magnitude=torch.ones(10))
    for _ in dora.rows(4):
        pass
    rescaled = torch.ones(10, 1).double() * (0.5 * (b.double() @ a.double()))
    rescaled = rescaled / rescaled.norm(dim=1, keepdim=True)
    assert dora.relative_change == pytest.approx(float(rescaled.norm()), rel=1e-4)
