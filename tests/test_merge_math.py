"""The merge's arithmetic on its own, against values computed here in float64: several row blocks with a partial last
one (the models in the other tests fit in one block), the ‖ΔW‖/‖W‖ figure for a change smaller than 1, the one reused
block buffer that keeps memory at a block, and the float16 range check at its exact edges. Then, in several blocks
with a partial last one, against PEFT's merge_and_unload bit for bit (plain, rsLoRA, Conv1D, embedding; fp32 and bf16
bases). Warnings are errors: a merge that makes torch warn (an out= buffer of the wrong size) is wrong somewhere."""

from __future__ import annotations

import math

import pytest
import torch

from exporter.errors import NonFiniteError
from exporter.merge_math import LoraMerge, cast_rows, merge_lora

pytestmark = pytest.mark.filterwarnings("error")


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


# -- bit for bit with PEFT, in many row blocks ---------------------------------------------------------------------
# The merge computes each block's rows of B@A with their own torch.mm. A matrix product's rounding depends on its
# shape (MKL computes a product of 1-3 rows with another kernel than a taller one), so blocks can drift from the one
# whole B@A that PEFT computes, in the last bit, on a few rows: visible only at atol 0, on tensors of several blocks.

SCALES = {"lora": (8, 12, False), "rslora": (8, 12, True)}  # r, alpha, use_rslora: 1.5 and 12/√8, both rounding


def _peft_merge(kind: str, rows: int, cols: int, *, r: int, alpha: int, use_rslora: bool, bf16_base: bool):
    """A base layer of ``rows`` stored rows, a PEFT LoRA on it with random A and B, and PEFT's merge_and_unload:
    (the stored weight, lora_A, lora_B, PEFT's merged weight in float32). PEFT merges a bf16 base in float32 (the
    weights upcast, as tests/conftest.peft_merged_state does): the README promises that float32 merge, rounded once."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(rows * cols + r)
    layer = {"linear": lambda: torch.nn.Linear(cols, rows, bias=False),  # W (out, in)
             "conv1d": lambda: Conv1D(cols, rows),  # GPT-2: W stored (in, out) = (rows, cols)
             "embedding": lambda: torch.nn.Embedding(rows, cols)}[kind]()
    if bf16_base:
        with torch.no_grad():
            layer.weight.copy_(layer.weight.bfloat16().float())
    holder = torch.nn.Module()
    holder.layer = layer
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, fan_in_fan_out=kind == "conv1d",
                        target_modules=["layer"], init_lora_weights=False)
    peft_model = get_peft_model(holder, config)
    lora = peft_model.base_model.model.layer
    if kind == "embedding":
        a, b = lora.lora_embedding_A["default"], lora.lora_embedding_B["default"]
    else:
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    a, b, weight = a.detach().clone(), b.detach().clone(), layer.weight.detach().clone()
    merged = peft_model.merge_and_unload().layer.weight.detach().clone()
    return (weight.bfloat16() if bf16_base else weight), a, b, merged


def _scale(r: int, alpha: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r  # PEFT's LoraLayer.update_layer


@pytest.fixture
def one_thread():
    """PEFT's own B@A depends on the thread count for some shapes (MKL splits the product's columns among threads:
    a (64, 99) product rounds its last 3 columns differently with 4 threads than with 1), so PEFT's merge and ours
    both run single-threaded, as the pipeline's merge workers do (tensor_stream.pump)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("bf16_base", [False, True], ids=["fp32-base", "bf16-base"])
@pytest.mark.parametrize("scaling", list(SCALES))
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_many_blocks_equal_peft_merge_and_unload_bit_for_bit(one_thread, kind, scaling, bf16_base):
    """99 stored rows in 3 to 8 blocks, the last one partial: 1, 3 or 19 rows."""
    r, alpha, use_rslora = SCALES[scaling]
    weight, a, b, peft = _peft_merge(kind, 99, 64, r=r, alpha=alpha, use_rslora=use_rslora, bf16_base=bf16_base)
    variant = {"fan_in_fan_out": kind == "conv1d", "embedding": kind == "embedding"}
    for rows_per_block in (14, 32, 20):  # last blocks of 1, 3 and 19 rows
        merge = LoraMerge(weight, a, b, _scale(r, alpha, use_rslora), name="w", **variant)
        blocks = [(start, stop, rows.clone()) for start, stop, rows in merge.rows(rows_per_block)]
        assert len(blocks) >= 3 and 0 < blocks[-1][1] - blocks[-1][0] < rows_per_block
        merged = torch.cat([rows for _, _, rows in blocks])
        differ = (merged != peft).any(dim=1).nonzero().flatten().tolist()
        assert not differ, f"rows_per_block {rows_per_block}: rows {differ} differ from PEFT's merge"
        whole = merge_lora(weight, a, b, _scale(r, alpha, use_rslora), name="w", rows_per_block=rows_per_block,
                           **variant).weight
        assert whole.dtype == weight.dtype and torch.equal(whole, peft.to(weight.dtype)), rows_per_block


def test_default_block_size_on_a_qwen3_down_proj_equals_peft(one_thread):
    """Qwen3-0.6B's down_proj (1024, 3072) at the stream's default block size: 341 rows a block, the last one 1 row
    (the one row a tall product and a 1-row product round differently)."""
    from converters.tensor_stream import BLOCK_VALUES

    weight, a, b, peft = _peft_merge("linear", 1024, 3072, r=16, alpha=32, use_rslora=False, bf16_base=True)
    rows_per_block = BLOCK_VALUES // 3072
    assert 1024 % rows_per_block == 1
    merged = torch.cat([rows.clone() for _, _, rows in LoraMerge(weight, a, b, 2.0, name="w").rows(rows_per_block)])
    assert torch.equal(merged, peft)
    assert torch.equal(merge_lora(weight, a, b, 2.0, name="w", rows_per_block=rows_per_block).weight,
                       peft.bfloat16())
