"""Parity: passes a right merge, fails a wrong one, and its reference agrees with PEFT's unmerged model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_peft_adapter, build_tiny_base, peft_unmerged_logits, run_export
from exporter.errors import ParityError
from exporter.parity.figures import compare_logits, judge
from exporter.parity.tolerances import Tolerance


def test_compare_logits_hand_computed():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    out = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.5, 0.0]])
    figures = compare_logits(ref, out)
    p = torch.softmax(ref[0].double(), -1)
    q = torch.softmax(out[0].double(), -1)
    kl_row0 = float((p * (p / q).log()).sum())
    assert figures.kl == pytest.approx(kl_row0 / 2)  # row 1 is identical
    assert figures.max_abs == 2.0 and figures.top1 == 0.5
    # Row 0 has a top-2 margin of 2 (decisive) and flipped; row 1 a margin of 0.5 (a near-tie, not judged).
    assert figures.decisive_positions == 1 and figures.top1_decisive == 0.0
    assert judge(figures, Tolerance(None, 1.0, 0.99, "")) == ["top-1 0.00% < 99%"]
    assert judge(figures, Tolerance(1.0, None, None, "")) == ["max|Δ| 2 > 1"]
    assert judge(figures, Tolerance(None, math.inf, 0.0, "")) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    base = build_tiny_base(root / "base")
    adapter = build_peft_adapter(root / "adapter", base, r=16, lora_alpha=16,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
    return base, adapter


def _scale_off_by_sqrt_r(monkeypatch):
    """Make the *merge* (not the reference) use α/r·√r: the bug of a tool that confuses LoRA and rsLoRA."""
    from conftest import break_merge_scale

    break_merge_scale(monkeypatch, lambda scale, rank: scale * math.sqrt(rank))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wrong_scale_fails_parity_and_writes_nothing(tiny, tmp_path, monkeypatch, dtype):
    base, adapter = tiny
    _scale_off_by_sqrt_r(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ParityError) as error:
        run_export(base, adapter, out, dtype=dtype)
    assert "parity failed" in str(error.value)
    assert not out.exists()
    report = json.loads((tmp_path / "out.failed-report.json").read_text())
    parity = report["artifacts"][0]["parity"]
    assert parity["passed"] is False and parity["failures"]


def test_right_merge_passes_in_both_dtypes(tiny, tmp_path):
    base, adapter = tiny
    for dtype in ("float32", "bfloat16"):
        ctx = run_export(base, adapter, tmp_path / dtype, dtype=dtype)
        assert ctx.artifacts[0].parity.passed, ctx.artifacts[0].parity
        assert "Parity against base + adapter" in (tmp_path / dtype / "README.md").read_text()


@pytest.fixture(scope="module")
def trained_bf16(tmp_path_factory):
    """A bf16 base and a trained adapter whose modules have three different scales (a rank and an alpha pattern)."""
    from conftest import train_adapter

    root = tmp_path_factory.mktemp("report")
    base = build_tiny_base(root / "base", dtype=torch.bfloat16)
    adapter = train_adapter(root / "adapter", base, r=8, lora_alpha=16, rank_pattern={"v_proj": 4},
                            alpha_pattern={"down_proj": 4}, target_modules=["q_proj", "v_proj", "down_proj"])
    return base, adapter


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kl(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ out) per position, float64."""
    log_p, log_q = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_report_json_states_what_independent_sources_say(trained_bf16, tmp_path, dtype):
    """report.json against facts the test gets elsewhere: hashlib over the input files, each module's scale worked
    out by hand from adapter_config.json, ‖s·B@A‖/‖W‖ from the adapter's tensors, and the parity figures recomputed
    from PEFT's unmerged model and transformers' loading of the written folder on the same probe ids."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from exporter.parity.probes import probe_inputs  # the ids parity feeds (inputs only, not figures)

    base, adapter = trained_bf16
    out = tmp_path / "out"
    run_export(base, adapter, out, dtype=dtype)
    report = json.loads((out / "report.json").read_text())

    assert report["inputs"]["base_sha256"] == {"model.safetensors": _sha256(base / "model.safetensors")}
    assert report["inputs"]["adapter_sha256"] == {
        "adapter_model.safetensors": _sha256(adapter / "adapter_model.safetensors")}

    # Scales by hand: α/r, with v_proj's rank 4 and down_proj's alpha 4 from the patterns.
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        8, 16, {"v_proj": 4}, {"down_proj": 4})
    parents = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
    expected = {f"model.layers.{i}.{parents[m]}.{m}.weight": (rank, alpha, alpha / rank)
                for i in range(2) for m, rank, alpha in (("q_proj", 8, 16), ("v_proj", 4, 16), ("down_proj", 8, 4))}
    per_tensor = {m["tensor"]: m for m in report["merge"]["per_tensor"]}
    assert {n: (m["rank"], m["alpha"], m["scale"]) for n, m in per_tensor.items()} == expected
    assert report["merge"]["lora_modules"] == 6 and sorted(report["merge"]["scales"]) == [0.5, 2.0, 4.0]
    base_state, lora = load_file(base / "model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    for name, (_, _, scale) in expected.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        delta = scale * lora[prefix + ".lora_B.weight"].float() @ lora[prefix + ".lora_A.weight"].float()
        change = float(delta.norm() / base_state[name].float().norm())
        assert per_tensor[name]["relative_change"] == pytest.approx(change, rel=1e-4), name

    # Parity figures from PEFT's unmerged model (the reference) and the written folder run by transformers in
    # float32 (the artifact), on the probe ids parity used: the tiny base has no tokenizer, so random ids only.
    parity = report["artifacts"][0]["parity"]
    assert parity["probes"] == "random ids" and parity["dtype"] == dtype and parity["passed"]
    probes = probe_inputs(None, 128, 128).inputs
    with torch.no_grad():
        ref = torch.cat([peft_unmerged_logits(base, adapter, p.unsqueeze(0))[0] for p in probes])
        artifact_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ours = torch.cat([artifact_model(input_ids=p.unsqueeze(0)).logits[0] for p in probes])
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        base_logits = torch.cat([base_model(input_ids=p.unsqueeze(0)).logits[0] for p in probes])
    kl, adapter_kl = float(_kl(ref, ours).mean()), float(_kl(ref, base_logits).mean())
    top2 = ref.topk(2, -1).values
    decisive = top2[:, 0] - top2[:, 1] >= 1.0  # the README's decisive margin: 1 logit
    agree = ref.argmax(-1) == ours.argmax(-1)
    assert parity["positions"] == ref.shape[0] == sum(len(p) for p in probes)
    # Parity's reference is its own hooks, within 1e-5 of PEFT's logits (test_reference_hooks_equal_peft_unmerged):
    # the figures may differ by that much, and no more. Measured: identical here (KL 3.5e-13 in float32, 1.5e-5 in
    # bfloat16; max|Δ| and adapter_kl equal to the last bit).
    assert parity["max_abs"] == pytest.approx(float((ref - ours).abs().max()), abs=2e-5)
    assert parity["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-12)
    assert parity["adapter_kl"] == pytest.approx(adapter_kl, rel=1e-3)
    assert parity["adapter_effect_kept"] == pytest.approx(1 - kl / adapter_kl, abs=1e-6)
    assert parity["top1"] == float(agree.float().mean())
    assert parity["decisive_positions"] == int(decisive.sum())
    assert parity["top1_decisive"] == float(agree[decisive].float().mean())
    assert adapter_kl > 100 * kl  # the adapter's effect is far above the merge's error: the figures can tell


def test_accept_parity_failure_keeps_output_and_says_so(tiny, tmp_path, monkeypatch):
    base, adapter = tiny
    _scale_off_by_sqrt_r(monkeypatch)
    ctx = run_export(base, adapter, tmp_path / "out", accept_parity_failure=True)
    assert ctx.artifacts[0].parity.passed is False
    assert json.loads((tmp_path / "out" / "report.json").read_text())["artifacts"][0]["parity"]["passed"] is False


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"])),
    ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])),
    ("qwen2", dict(r=4, lora_alpha=8, use_rslora=True, lora_bias=True, target_modules=["k_proj"])),
    ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True, target_modules=["c_attn", "c_fc"])),
    ("gemma3", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "o_proj"])),
])
def test_reference_hooks_equal_peft_unmerged(tmp_path, probe_ids, arch, kwargs):
    """Parity's oracle is our own hooks, so they must agree with PEFT's unmerged forward."""
    from exporter.parity.reference import load_reference

    base = build_tiny_base(tmp_path / "base", arch)
    adapter = build_peft_adapter(tmp_path / "adapter", base, **kwargs)
    with torch.no_grad():
        ours = load_reference(base, adapter, torch.device("cpu"))(input_ids=probe_ids).logits
    peft = peft_unmerged_logits(base, adapter, probe_ids)
    assert (ours - peft).abs().max() <= 1e-5
    # …and the adapter matters: without it the logits are far away.
    from conftest import model_logits

    assert (model_logits(base, probe_ids) - peft).abs().max() > 1e-2


def test_reference_applies_dora_around_a_nonzero_bias(tmp_path, probe_ids):
    """transformers initialises biases to zero, which would hide the bias term of DoRA's rescaling."""
    from exporter.parity.reference import load_reference

    base = build_tiny_base(tmp_path / "base", "qwen2", random_biases=True)
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, use_dora=True,
                                 target_modules=["q_proj", "k_proj", "v_proj"])
    with torch.no_grad():
        ours = load_reference(base, adapter, torch.device("cpu"))(input_ids=probe_ids).logits
    assert (ours - peft_unmerged_logits(base, adapter, probe_ids)).abs().max() <= 1e-5


def _break_adapter_reading(monkeypatch, bug: str) -> None:
    """A bug in how the *merge* reads the adapter (exporter/adapter.py); the reference reads it on its own."""
    import exporter.adapter as adapter_module

    if bug == "pattern applied to every module":
        monkeypatch.setattr(adapter_module, "pattern_key", lambda keys, name: next(iter(keys), None))
    elif bug == "rsLoRA read as plain LoRA":
        monkeypatch.setattr(adapter_module, "compute_scale", lambda alpha, rank, rslora: alpha / rank)


@pytest.mark.parametrize("bug", ["pattern applied to every module", "rsLoRA read as plain LoRA"])
def test_a_misread_adapter_fails_parity(tmp_path, monkeypatch, bug):
    from conftest import train_adapter

    base = build_tiny_base(tmp_path / "base", dtype=torch.bfloat16)
    kwargs = (dict(r=8, lora_alpha=16, alpha_pattern={"v_proj": 64}) if bug == "pattern applied to every module"
              else dict(r=16, lora_alpha=8, use_rslora=True))
    adapter = train_adapter(tmp_path / "adapter", base, target_modules=["q_proj", "v_proj", "down_proj"], **kwargs)
    ctx = run_export(base, adapter, tmp_path / "right")
    assert ctx.artifacts[0].parity.passed
    _break_adapter_reading(monkeypatch, bug)
    with pytest.raises(ParityError):
        run_export(base, adapter, tmp_path / "wrong")


def test_decisive_positions_are_those_with_a_top2_margin_of_one_logit():
    """README: top-1 is judged where the reference's top-2 margin is ≥ 1 logit. Margins 1.5, 1.0, 0.99 and 0.2 here;
    the output flips the last two (near-ties), then also the first."""
    reference = torch.tensor([[3.0, 1.5, 0.0], [2.0, 1.0, 0.0], [1.99, 1.0, 0.0], [0.2, 0.0, -1.0]])
    flipped_near_ties = torch.tensor([[3.0, 1.5, 0.0], [2.0, 1.0, 0.0], [1.0, 1.99, 0.0], [0.0, 0.2, -1.0]])
    figures = compare_logits(reference, flipped_near_ties)
    assert figures.decisive_positions == 2 and figures.top1_decisive == 1.0 and figures.top1 == 0.5
    flipped_decisive = flipped_near_ties.clone()
    flipped_decisive[0] = torch.tensor([1.5, 3.0, 0.0])
    assert compare_logits(reference, flipped_decisive).top1_decisive == 0.5


def test_random_id_probes_get_ten_times_the_kl_and_max_abs_bounds_and_no_top1():
    """README: random-id probes are judged by ten times the declared KL and max |Δ| bounds, top-1 not judged."""
    from exporter.stages.parity import _out_of_distribution

    loose = _out_of_distribution(Tolerance(1e-3, 2e-2, 0.99, "declared"))
    assert (loose.max_abs, loose.max_kl, loose.min_top1) == (pytest.approx(1e-2), pytest.approx(0.2), None)
    assert _out_of_distribution(Tolerance(None, 1e-3, None, "kl only")).max_abs is None


def test_report_json_keeps_the_random_id_probes_apart_with_ten_times_the_bounds(tmp_path):
    """With a tokenizer, text probes are judged by the declared tolerance and the random-id probes apart: report.json
    carries both, the random ones over exactly the random ids fed, under ten times the declared KL and max |Δ|."""
    from conftest import build_bf16_llama, train_adapter
    from exporter.parity.probes import RANDOM_LENGTH, RANDOM_SEQUENCES

    base = build_bf16_llama(tmp_path / "base")
    adapter = train_adapter(tmp_path / "adapter", base, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    run_export(base, adapter, tmp_path / "out", dtype="float32")  # float32: judged by max |Δ| (bf16: by KL)
    parity = json.loads((tmp_path / "out" / "report.json").read_text())["artifacts"][0]["parity"]
    assert parity["probes"] == "text" and parity["passed"]
    random = parity["random_probes"]
    assert random["positions"] == RANDOM_SEQUENCES * RANDOM_LENGTH  # the ids drawn, none of the text
    declared = parity["thresholds"]
    assert random["thresholds"] == {k: None if declared[k] is None else pytest.approx(10 * declared[k])
                                    for k in ("max_abs", "max_kl")}
    assert declared["max_abs"] is not None  # a bound really judged, so the factor shows
    assert 0 <= random["kl"] and 0 <= random["max_abs"] and 0 <= random["top1"] <= 1


def test_auto_parity_memory_runs_whole_only_with_half_again_the_float32_model_and_a_gib_to_spare(tmp_path,
                                                                                              monkeypatch):
    """--parity-memory auto (the default): whole-model parity needs the model in float32 × 1.5 + 1 GiB of available
    memory, counted from the merged tensors (a bf16 base is twice its bytes in float32); one byte less streams."""
    import dataclasses
    from types import SimpleNamespace

    import exporter.stages.parity as parity_stage

    base = build_tiny_base(tmp_path / "base", dtype=torch.bfloat16)
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    ctx = run_export(base, adapter, tmp_path / "out", parity=False)
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "pt") as f:  # the oracle: every float tensor of the base, in float32
        fp32_bytes = sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    need = int(fp32_bytes * 1.5) + 2**30
    for available, mode in ((need, "whole"), (need - 1, "streamed")):
        monkeypatch.setattr(parity_stage.psutil, "virtual_memory", lambda a=available: SimpleNamespace(available=a))
        assert parity_stage.choose_parity_mode(ctx)[0] == mode, (available, need)
    ctx.plan = dataclasses.replace(ctx.plan, parity_memory="whole")  # asked for: taken as asked, whatever is free
    assert parity_stage.choose_parity_mode(ctx)[0] == "whole"
    # The reason the report gives names both figures in GB: a 7B-sized layout (one bf16 tensor of 7e9 values,
    # 28 GB in float32) with 20 GB available streams, and says so.
    from exporter.layout import OutputTensor, Source

    big = OutputTensor("model.embed_tokens.weight", Source.COPY, "model.embed_tokens.weight", (70_000, 100_000),
                       torch.bfloat16)
    ctx.plan = dataclasses.replace(ctx.plan, parity_memory="auto")
    ctx.layout = dataclasses.replace(ctx.layout, tensors=[big])
    monkeypatch.setattr(parity_stage.psutil, "virtual_memory", lambda: SimpleNamespace(available=20e9))
    assert parity_stage.choose_parity_mode(ctx) == (
        "streamed", "auto: the model is 28.00 GB in float32, 20.0 GB of memory is available, so module by module")


def test_a_resized_vocabulary_without_any_tokenizer_is_checked_without_an_effect_figure(tmp_path):
    """No tokenizer anywhere, so every probe is random ids, and with a resized vocabulary each holds added tokens
    the base cannot read: the base alone has nothing to run. Parity still judges the merged model against base +
    adapter (which it must pass), and reports no share of the adapter's effect rather than crashing."""
    from conftest import build_peft_adapter, build_tiny_base, run_export

    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"],
                                 resize_vocab_to=136, modules_to_save=["embed_tokens", "lm_head"])
    ctx = run_export(base, adapter, tmp_path / "out")
    (artifact,) = ctx.artifacts
    assert artifact.parity.passed and artifact.parity.adapter_effect_kept is None
