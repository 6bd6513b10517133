"""The merge math: one pure computation of tensors that every path uses.

W' = W + s·(B @ A), accumulated in float32. Variants:
  * fan_in_fan_out (GPT-2 Conv1D stores W as (in, out)): ΔW is transposed before the add.
  * embedding LoRA: A is (r, vocab), B is (dim, r) and ΔW = (B @ A)ᵀ · s, so W' (vocab, dim) = W + ΔW.
  * DoRA: W' = (m / ‖W + s·BA‖_row) ⊙ (W + s·BA), the L2 norm taken over the input dimension of each output unit
    (dim=1 in (out, in) layout), exactly as PEFT's DoraLinearLayer.get_weight_norm and DoraLinearVariant.merge_safe.

The merged tensor comes out in float32 row blocks (``LoraMerge.rows``): every output format casts or quantizes those
same blocks to its own type, once. ``merge_lora`` assembles the blocks into one tensor for callers that want it whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from converters.tensor_stream import within
from exporter.errors import NonFiniteError


@dataclass(frozen=True)
class MergeResult:
    weight: torch.Tensor  # in out_dtype, same layout as the stored base weight, on the CPU
    relative_change: float  # ‖ΔW‖ / ‖W‖ in float32, a cheap signal that the adapter did something


def _finite_or_raise(t: torch.Tensor, name: str, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            name, f"{what} holds NaN or Inf.",
            "retrain or re-save the adapter (pass --no-check-finite only to inspect the damage).",
        )


def cast_rows(dst: torch.Tensor, rows: torch.Tensor, name: str, check_finite: bool = True,
              fix: str = "merge to float32 or bfloat16 instead (--dtype).") -> None:
    """dst[...] = rows, cast once to dst's dtype. With ``check_finite``, a value beyond what dst's dtype holds (it
    would become Inf in the file) is a NonFiniteError naming the tensor, with ``fix``."""
    if check_finite and rows.is_floating_point() and torch.finfo(dst.dtype).max < torch.finfo(rows.dtype).max:
        if not within(rows, torch.finfo(dst.dtype).max):  # (vector_norm(ord=inf) is ~25x slower than its aminmax)
            _finite_or_raise(rows, name, "the merged tensor")
            raise NonFiniteError(name, f"the merged tensor has values beyond what {dst.dtype} holds.", fix)
    dst.copy_(rows)


def _add_delta(w: torch.Tensor, product: torch.Tensor, scale: float) -> None:
    """w += scale · product, rounded as PEFT's get_delta_weight + merge round it: the product, then the product
    scaled, then the sum, each rounded to float32 (one fused addmm would round once less and differ from PEFT's merge
    in the last bit wherever the scale is not a power of two)."""
    w.add_(product.mul_(scale))


# The fewest rows of B@A computed in one product (see LoraMerge.rows): tall enough for the kernel a whole B@A uses.
_MIN_PRODUCT_ROWS = 16


class LoraMerge:
    """One LoRA pair merged into one stored weight, computed in row blocks of the stored layout.

    ``name`` is used only in error messages. NonFiniteError names the tensor when A, B or the result holds NaN/Inf
    (``check_finite``). After ``rows`` has been consumed, ``relative_change`` holds ‖ΔW‖/‖W‖ (of the final weight, DoRA
    rescaling included).
    """

    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *, name: str,
                 fan_in_fan_out: bool = False, embedding: bool = False, magnitude: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", check_finite: bool = True) -> None:
        self.name, self.scale, self.check_finite = name, scale, check_finite
        self.device = torch.device(device)
        a = lora_a.to(device=self.device, dtype=torch.float32)
        b = lora_b.to(device=self.device, dtype=torch.float32)
        if check_finite:
            _finite_or_raise(a, name, "the adapter's lora_A")
            _finite_or_raise(b, name, "the adapter's lora_B")
        # Work in the frame where the rows of the stored W are the rows of the left factor, so each block's ΔW rows
        # come from one small matmul:
        #   Linear:     W (out, in)   += s · B (out, r)   @ A (r, in)
        #   Conv1D:     W (in, out)   += s · Aᵀ (in, r)   @ Bᵀ (r, out)   (= (B @ A)ᵀ)
        #   Embedding:  W (vocab, d)  += s · Aᵀ (vocab, r) @ Bᵀ (r, d)    (= (B @ A)ᵀ)
        self.transposed = fan_in_fan_out or embedding
        self.left, self.right = (a.T.contiguous(), b.T.contiguous()) if self.transposed else (b, a)
        if tuple(weight.shape) != (self.left.shape[0], self.right.shape[1]):
            raise ValueError(f"{name}: base {tuple(weight.shape)} does not fit B@A "
                             f"{(self.left.shape[0], self.right.shape[1])}")
        self.weight = weight
        self.magnitude = magnitude
        self.relative_change = float("nan")

    def _delta_norm(self) -> float:
        """‖s·L@R‖_F from two r×r Gram matrices: ‖L@R‖² = Σ (LᵀL ⊙ RRᵀ), never a full-size ΔW."""
        gram = (self.left.T @ self.left) * (self.right @ self.right.T)
        return abs(self.scale) * float(gram.sum().clamp_min(0).sqrt())

    def rows(self, rows_per_block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, W'[start:stop] in float32 on the CPU). On the CPU the block is a reused buffer, valid until
        the next one: it is converted, added and checked while it sits in cache."""
        if self.magnitude is not None or self.device.type != "cpu":
            yield from self._whole(rows_per_block)
            return
        weight, n_rows = self.weight, self.weight.shape[0]
        buffer = torch.empty(min(rows_per_block, n_rows), *weight.shape[1:], dtype=torch.float32)
        # Every block's rows of B@A come out of a product of the same ``window`` rows, never fewer than 16 (the last,
        # partial block's reaches back into the block before it): a product's rounding depends on its row count, MKL
        # computing 1-3 rows with other kernels than taller products, and PEFT computes B@A whole. Products of just the
        # last block's rows differed from PEFT's merge in the last bit (measured, torch 2.13: 99 rows in blocks of 14,
        # the last row; Qwen3-0.6B's down_proj at the stream's default block size, its last row). The cost: one
        # partial block's product more per tensor.
        window = min(max(rows_per_block, _MIN_PRODUCT_ROWS), n_rows)
        delta_buffer = torch.empty(window, self.right.shape[1], dtype=torch.float32)
        base_sq = 0.0
        for start in range(0, n_rows, rows_per_block):
            stop = min(start + rows_per_block, n_rows)
            block, first = buffer[: stop - start], max(stop - window, 0)
            block.copy_(weight[start:stop])
            # vector_norm, not dot: torch.dot on the CPU is ~200x slower for this size (measured, torch 2.13).
            base_sq += float(torch.linalg.vector_norm(block)) ** 2
            product = torch.mm(self.left[first:first + window], self.right, out=delta_buffer)
            _add_delta(block, product.narrow(0, start - first, stop - start), self.scale)
            if self.check_finite:
                # aminmax propagates NaN and Inf and allocates nothing; isfinite().all() would fault in a bool tensor
                # the block's size every time.
                low, high = torch.aminmax(block)
                if not (math.isfinite(float(low)) and math.isfinite(float(high))):
                    _finite_or_raise(block, self.name, "the merged tensor")
            yield start, stop, block
        self.relative_change = self._delta_norm() / base_sq**0.5 if base_sq > 0 else self._delta_norm()

    def _whole(self, rows_per_block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The tensor in one piece on the merge device: DoRA needs whole-row norms, and a GPU merges in one addmm."""
        source = self.weight.to(self.device)
        w = source.to(torch.float32, copy=True)
        base_norm = float(torch.linalg.vector_norm(w))
        _add_delta(w, self.left @ self.right, self.scale)
        if self.magnitude is not None:
            m = self.magnitude.to(device=self.device, dtype=torch.float32).reshape(-1)
            norm = torch.linalg.vector_norm(w, dim=0 if self.transposed else 1)
            w.mul_((m / norm).unsqueeze(0) if self.transposed else (m / norm).unsqueeze(1))
            delta_norm = float(torch.linalg.vector_norm(w - source.to(torch.float32)))
        else:
            delta_norm = self._delta_norm()
        if self.check_finite:
            _finite_or_raise(w, self.name, "the merged tensor")
        w = w.cpu()
        for start in range(0, w.shape[0], rows_per_block):
            stop = min(start + rows_per_block, w.shape[0])
            yield start, stop, w[start:stop]
        self.relative_change = delta_norm / base_norm if base_norm > 0 else delta_norm


class DeltaMerge:
    """A whole change ΔW (several adapters already combined, exporter/combine.py's DeltaCombination) added to one
    stored weight: W' = W + ΔW in float32, handed on in row blocks as LoraMerge.rows hands them. ``delta`` is called
    once, when the rows are asked for, and is in the frame of a Linear's (out, in) weight; ``transposed`` for weights
    stored (in, out) (GPT-2's Conv1D)."""

    def __init__(self, weight: torch.Tensor, delta: Callable[[], torch.Tensor], *, name: str,
                 transposed: bool = False, check_finite: bool = True) -> None:
        self.weight, self.delta, self.name = weight, delta, name
        self.transposed, self.check_finite = transposed, check_finite
        self.relative_change = float("nan")

    def rows(self, rows_per_block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        delta = self.delta()
        delta = delta.T if self.transposed else delta
        if tuple(delta.shape) != tuple(self.weight.shape):
            raise ValueError(f"{self.name}: base {tuple(self.weight.shape)} does not fit ΔW {tuple(delta.shape)}")
        w = self.weight.to(device=delta.device, dtype=torch.float32, copy=True)
        base_norm = float(torch.linalg.vector_norm(w))
        delta_norm = float(torch.linalg.vector_norm(delta))
        w.add_(delta)
        del delta
        if self.check_finite:
            _finite_or_raise(w, self.name, "the merged tensor")
        w = w.cpu()
        for start in range(0, w.shape[0], rows_per_block):
            stop = min(start + rows_per_block, w.shape[0])
            yield start, stop, w[start:stop]
        self.relative_change = delta_norm / base_norm if base_norm > 0 else delta_norm


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *, name: str,
               out_dtype: torch.dtype | None = None, rows_per_block: int = 1024, **variant) -> MergeResult:
    """Merge one LoRA pair into ``weight`` and return it whole, cast once to ``out_dtype`` (default: the weight's).
    ``variant``: fan_in_fan_out, embedding, magnitude, device, check_finite (see LoraMerge)."""
    merge = LoraMerge(weight, lora_a, lora_b, scale, name=name, **variant)
    merged = torch.empty(weight.shape, dtype=out_dtype or weight.dtype)
    for start, stop, block in merge.rows(rows_per_block):
        cast_rows(merged[start:stop], block, name, merge.check_finite)
    return MergeResult(merged, merge.relative_change)
