"""What parity's thresholds are made of, and the facts every format's tolerances share. Each format declares its own
tolerances, as data with the reason for each, in its module under exporter/formats/ (Format.tolerance looks them
up). Overridable per run (--max-abs/--max-kl/--min-top1).

Top-1 agreement is judged only on *decisive* positions, where the reference's top-2 margin is at least
DECISIVE_MARGIN logits: a flip between near-tied tokens is rounding, not a wrong merge (measured: PEFT's own bf16
merge flips 1 of 34 tokens on Gemma 3 270M, all near-ties). The raw top-1 figure is reported beside it. KL(ref‖out),
averaged over positions, is the main measure.
"""

from __future__ import annotations

from dataclasses import dataclass

DECISIVE_MARGIN = 1.0  # logits

# Random-id probes are out of distribution: logits reach |117| on Gemma 3 270M (text: ~40) and every rounding is
# amplified there (measured, Gemma 3 270M + trained adapter: GGUF Q8_0 KL 2.8e-3..8e-3 on text probes, 0.045 and 0.16 on
# the two random ones; bf16 storage ~1e-4 vs ~1.3e-3). When text probes exist they are judged by the declared tolerance
# and random ones by RANDOM_PROBE_FACTOR × its KL and max |Δ| bounds (top-1 not judged there); a model without a
# tokenizer has only random probes, and they get the declared tolerance. Structural errors (a missing permutation, a
# wrong scale) move random-probe KL by orders of magnitude, so the looser bound still catches them.
RANDOM_PROBE_FACTOR = 10.0


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None  # max |Δlogit| allowed, None: not judged
    max_kl: float | None  # mean KL(ref‖out) allowed
    min_top1: float | None  # top-1 agreement on decisive positions
    reason: str
    # Lossy formats that may legitimately round an adapter away: fail only when the artifact is further from the
    # reference than the base without the adapter is, by more than this many nats (no rounding explains that: a
    # broken file). Whether the adapter survived is judged by --min-effect-kept instead.
    broken_kl: float | None = None
