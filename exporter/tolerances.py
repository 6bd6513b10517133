"""Parity thresholds, declared as data with the reason for each. Overridable per run (--max-abs/--max-kl/--min-top1).

Top-1 agreement is judged only on *decisive* positions, where the reference's top-2 margin is at least
DECISIVE_MARGIN logits: a flip between near-tied tokens is rounding, not a wrong merge (see DESIGN.md: PEFT's own bf16
merge flips 1 of 34 tokens on Gemma 3 270M, all near-ties). The raw top-1 figure is reported beside it. KL(ref‖out),
averaged over positions, is the main measure.
"""

from __future__ import annotations

from dataclasses import dataclass

DECISIVE_MARGIN = 1.0  # logits


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None  # max |Δlogit| allowed, None: not judged
    max_kl: float | None  # mean KL(ref‖out) allowed
    min_top1: float | None  # top-1 agreement on decisive positions
    reason: str


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("safetensors", "float32"): Tolerance(
        1e-4, None, None,
        "fp32 weights run in fp32 differ from the fp32 reference only by summation order (measured ~1e-6 on tiny "
        "models); 1e-4 leaves room for deep models and still catches any wrong scale by orders of magnitude."),
    ("safetensors", "bfloat16"): Tolerance(
        None, 1e-3, 0.99,
        "bf16 keeps 8 mantissa bits, so logits move by ~1e-2 and near-ties flip; the distribution must not "
        "(KL ≈ 1e-4 measured for PEFT's own bf16 merge of Gemma 3 270M)."),
    ("safetensors", "float16"): Tolerance(
        None, 1e-3, 0.99,
        "fp16 rounds weights to 11 mantissa bits: smaller error than bf16, judged the same way."),
}


def tolerance_for(fmt: str, dtype: str) -> Tolerance:
    try:
        return TOLERANCES[(fmt, dtype)]
    except KeyError:
        known = ", ".join(f"{f}/{d}" for f, d in TOLERANCES)
        raise KeyError(f"no parity tolerance declared for {fmt}/{dtype} (declared: {known})") from None
