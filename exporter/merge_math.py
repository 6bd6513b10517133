"""The merge math: one pure function of tensors that every path calls.

W' = W + s·(B @ A), accumulated in float32 and cast to the output dtype once. Variants:
  * fan_in_fan_out (GPT-2 Conv1D stores W as (in, out)): ΔW is transposed before the add.
  * embedding LoRA: A is (r, vocab), B is (dim, r) and ΔW = (B @ A)ᵀ · s, so W' (vocab, dim) = W + ΔW.
  * DoRA: W' = (m / ‖W + s·BA‖_row) ⊙ (W + s·BA), the L2 norm taken over the input dimension of each output unit
    (dim=1 in (out, in) layout), exactly as PEFT's DoraLinearLayer.get_weight_norm and DoraLinearVariant.merge_safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exporter.errors import NonFiniteError

# Elements merged per step on the CPU: a 4 MiB fp32 block plus its bf16 source stays in cache, which makes the
# convert-add-convert several times faster than whole-tensor passes (1.6 GB/s vs 0.34 GB/s of bf16 on 2 cores), and
# large enough that the per-block Python overhead stays small.
_CPU_BLOCK_ELEMENTS = 1024 * 1024


@dataclass(frozen=True)
class MergeResult:
    weight: torch.Tensor  # in out_dtype, same layout as the stored base weight, on the merge device
    relative_change: float  # ‖ΔW‖ / ‖W‖ in float32, a cheap signal that the adapter did something


def _finite_or_raise(t: torch.Tensor, name: str, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            name, f"{what} holds NaN or Inf.",
            "retrain or re-save the adapter (pass --no-check-finite only to inspect the damage).",
        )


def merge_lora(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    name: str,
    out_dtype: torch.dtype | None = None,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
    magnitude: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    check_finite: bool = True,
) -> MergeResult:
    """Merge one LoRA pair into ``weight`` and return it in ``out_dtype`` (default: the weight's dtype).

    ``name`` is used only in error messages. Raises NonFiniteError naming the tensor when A, B or the result holds
    NaN/Inf (``check_finite``).
    """
    out_dtype = out_dtype or weight.dtype
    device = torch.device(device)
    a = lora_a.to(device=device, dtype=torch.float32)
    b = lora_b.to(device=device, dtype=torch.float32)
    if check_finite:
        _finite_or_raise(a, name, "the adapter's lora_A")
        _finite_or_raise(b, name, "the adapter's lora_B")
    # Work in the frame where the rows of the stored W are the rows of the left factor, so one fused addmm does the
    # add without materialising ΔW:
    #   Linear:     W (out, in)   += s · B (out, r)   @ A (r, in)
    #   Conv1D:     W (in, out)   += s · Aᵀ (in, r)   @ Bᵀ (r, out)   (= (B @ A)ᵀ)
    #   Embedding:  W (vocab, d)  += s · Aᵀ (vocab, r) @ Bᵀ (r, d)    (= (B @ A)ᵀ)
    transposed = fan_in_fan_out or embedding
    left, right = (a.T.contiguous(), b.T.contiguous()) if transposed else (b, a)
    if tuple(weight.shape) != (left.shape[0], right.shape[1]):
        raise ValueError(f"{name}: base {tuple(weight.shape)} does not fit B@A {(left.shape[0], right.shape[1])}")

    # ‖s·L@R‖_F² = s²·Σ (LᵀL ⊙ RRᵀ): two r×r Gram matrices instead of a full-size ΔW.
    delta_norm = abs(scale) * float(((left.T @ left) * (right @ right.T)).sum().clamp_min(0).sqrt())
    source = weight.to(device)

    if magnitude is not None:
        # DoRA needs whole-row norms (columns when stored transposed): merge the tensor in one piece.
        w = source.to(torch.float32, copy=True)
        base_norm = float(torch.linalg.vector_norm(w))
        w.addmm_(left, right, alpha=scale)
        m = magnitude.to(device=device, dtype=torch.float32).reshape(-1)
        norm = torch.linalg.vector_norm(w, dim=0 if transposed else 1)
        w.mul_((m / norm).unsqueeze(0) if transposed else (m / norm).unsqueeze(1))
        delta_norm = float(torch.linalg.vector_norm(w - source.to(torch.float32)))
        merged = w.to(out_dtype)
        if check_finite:
            _finite_or_raise(w, name, "the merged tensor")
    elif device.type == "cpu":
        # Row blocks through one reused fp32 buffer: each block is converted, added, checked and converted back while
        # it sits in cache, and no fresh memory is faulted in per block. (The merge stage runs this single-threaded,
        # one tensor per core: for blocks this size torch's intra-op threads cost more than they give.)
        merged = torch.empty(weight.shape, dtype=out_dtype)
        rows_per_block = max(1, _CPU_BLOCK_ELEMENTS // max(1, weight.shape[1]))
        buffer = torch.empty(min(rows_per_block, weight.shape[0]), weight.shape[1], dtype=torch.float32)
        largest_allowed = torch.finfo(out_dtype).max
        base_sq, in_range = 0.0, True
        for start in range(0, weight.shape[0], rows_per_block):
            stop = min(start + rows_per_block, weight.shape[0])
            block = buffer[: stop - start]
            block.copy_(source[start:stop])
            # vector_norm, not dot: torch.dot on the CPU is ~200x slower for this size (measured, torch 2.13).
            base_sq += float(torch.linalg.vector_norm(block)) ** 2
            block.addmm_(left[start:stop], right, alpha=scale)
            if check_finite:
                # aminmax propagates NaN, and every comparison with NaN is False; a value past the output dtype's
                # range would become Inf in the file. (vector_norm(ord=inf) takes a ~25x slower path.)
                low, high = torch.aminmax(block)
                in_range = in_range and float(low) >= -largest_allowed and float(high) <= largest_allowed
            merged[start:stop].copy_(block)
        base_norm = base_sq**0.5
        if check_finite and not in_range:
            _finite_or_raise(merged, name, "the merged tensor")  # NaN, or a value the cast turned into Inf
            raise NonFiniteError(name, f"the merged tensor has values beyond what {out_dtype} holds.",
                                 "merge to float32 or bfloat16 instead (--dtype).")
    else:
        w = source.to(torch.float32, copy=True)
        base_norm = float(torch.linalg.vector_norm(w))
        w.addmm_(left, right, alpha=scale)
        if check_finite:
            _finite_or_raise(w, name, "the merged tensor")
        merged = w.to(out_dtype)

    relative = delta_norm / base_norm if base_norm > 0 else delta_norm
    return MergeResult(weight=merged, relative_change=relative)
