"""The built-in demo fixture against golden figures that PEFT produced (scripts/regen_golden.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_output, model_logits, run_export

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from exporter.demo import build_demo

    base, adapter = build_demo(tmp_path_factory.mktemp("demo"))
    fixture = json.loads((GOLDEN / "demo_fixture.json").read_text())
    for rel, digest in fixture["weights_sha256"].items():
        actual = hashlib.sha256((base.parent / rel).read_bytes()).hexdigest()
        assert actual == digest, f"the demo fixture changed ({rel}); run scripts/regen_golden.py and review the diff"
    return base, adapter, fixture, load_file(GOLDEN / "demo_peft_logits.safetensors")


def test_fp32_merge_matches_peft_golden(demo, tmp_path):
    base, adapter, fixture, golden = demo
    run_export(base, adapter, tmp_path / "out", dtype="float32")
    merged = load_output(tmp_path / "out")
    for name, figures in fixture["peft_merged_tensors"].items():
        t = merged[name].double()
        assert float(t.norm()) == pytest.approx(figures["norm"], rel=1e-6), name
        assert float(t.sum()) == pytest.approx(figures["sum"], rel=1e-4, abs=1e-4), name
    logits = model_logits(tmp_path / "out", golden["input_ids"])
    assert (logits - golden["logits"]).abs().max() <= 1e-4


def test_reference_hooks_match_peft_golden(demo):
    from exporter.parity.reference import load_reference

    base, adapter, _, golden = demo
    model = load_reference(base, adapter, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=golden["input_ids"]).logits
    assert (logits - golden["logits"]).abs().max() <= 1e-5


def test_default_bf16_demo_run_passes_parity(demo, tmp_path):
    base, adapter, _, golden = demo
    ctx = run_export(base, adapter, tmp_path / "out")  # the demo's default: the base's bf16
    parity = ctx.artifacts[0].parity
    assert parity.dtype == "bfloat16" and parity.passed and parity.figures.decisive_positions > 0
    from exporter.parity.figures import compare_logits

    ours = model_logits(tmp_path / "out", golden["input_ids"], dtype=torch.bfloat16)
    figures = compare_logits(golden["logits"].reshape(-1, golden["logits"].shape[-1]), ours.reshape(-1, ours.shape[-1]))
    assert figures.kl <= 1e-3 and figures.top1_decisive >= 0.99
