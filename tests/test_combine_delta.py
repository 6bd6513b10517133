"""Several adapters combined on their full deltas (--combine-space delta: exporter/combine.py's DeltaCombination)
against mergekit 0.1.5 itself, run on full models built by merging each adapter, as a mergekit user would have to.

The full models are written in float64: model_i = base + ΔWᵢ with ΔWᵢ PEFT's own get_delta_weight (float32), so
model_i − base, what mergekit starts from, is exactly ΔWᵢ, and mergekit's magnitude ranking sees the values ours
sees. Our merge runs in float32 and mergekit's in float64: the outputs agree to float32 rounding. DARE's masks are
random on both sides (mergekit draws from torch's global generator): at density 1 it must equal mergekit exactly as
the other methods do; below 1 its statistics are compared (how much it keeps, the rescaled L1 norm), and the masks
of one adapter are checked by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_bf16_llama, load_output, train_adapter
from exporter.combine import CombineSpec
from exporter.context import ExportPlan
from exporter.errors import ExportError
from exporter.pipeline import run_pipeline

WEIGHTS = (0.7, -0.4)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(bf16 base, [a1, a2], their full float64 models, the float64 base): a1 rank 8 on q/v/up, a2 rank 4 on q/k/down,
    both trained a few steps."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("delta")
    base = build_bf16_llama(root / "base")
    adapters = [
        train_adapter(root / "a1", base, r=8, lora_alpha=16, tokenizer=True,
                      target_modules=["q_proj", "v_proj", "up_proj"]),
        train_adapter(root / "a2", base, r=4, lora_alpha=32, lr=1e-2, steps=5, tokenizer=True,
                      target_modules=["q_proj", "k_proj", "down_proj"]),
    ]
    base_state = {k: v.double() for k, v in load_file(base / "model.safetensors").items()}

    def full_model(folder, deltas: dict[str, torch.Tensor]):
        folder.mkdir()
        config = json.loads((base / "config.json").read_text())
        config["dtype"] = "float64"
        (folder / "config.json").write_text(json.dumps(config))
        state = {k: (v + deltas[k].double() if k in deltas else v).contiguous() for k, v in base_state.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    models = []
    for i, adapter in enumerate(adapters):
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        deltas = {f"{name.removeprefix('base_model.model.')}.weight": module.get_delta_weight("default").detach()
                  for name, module in peft.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}
        models.append(full_model(root / f"full{i}", deltas))
    return base, adapters, models, full_model(root / "base64", {})


def mergekit_merge(base64, models, out, method: str, density: float | None) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    parameters = [{"weight": w} | ({"density": density} if density is not None else {}) for w in WEIGHTS]
    config = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(base64), "dtype": "float64",
        "models": [{"model": str(m), "parameters": p} for m, p in zip(models, parameters)]})
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_output(out)


def ours(base, adapters, out, method: str, density: float | None, **spec) -> dict[str, torch.Tensor]:
    combine = CombineSpec(method, WEIGHTS, density=density, space="delta", **spec)
    run_pipeline(ExportPlan(base=str(base), adapter=str(adapters[0]), more_adapters=tuple(map(str, adapters[1:])),
                            combine=combine, out=out, dtype="float32", progress=False))
    return load_output(out)


def assert_close(mine: dict, theirs: dict, base: dict) -> None:
    assert set(mine) == set(theirs)
    for name, tensor in mine.items():
        reference = theirs[name].float()
        change = float((reference - base[name].float()).abs().max())
        assert torch.allclose(tensor, reference, rtol=0, atol=1e-6 + 1e-5 * change), name


@pytest.mark.parametrize("method,density", [("task_arithmetic", None), ("ties", 0.5), ("ties", 0.2),
                                            ("dare_linear", 1.0), ("dare_ties", 1.0)])
def test_delta_space_methods_merge_what_mergekit_merges(parts, tmp_path, method, density):
    """Each delta-space method equals mergekit's merge of the full models (DARE at density 1, where it draws no
    mask), and parity against the combination applied to the reference passes."""
    base, adapters, models, base64 = parts
    mine = ours(base, adapters, tmp_path / "ours", method, density)
    theirs = mergekit_merge(base64, models, tmp_path / "mergekit", method, density)
    assert_close(mine, theirs, load_output(base))
    report = json.loads((tmp_path / "ours" / "report.json").read_text())
    assert report["combination"]["space"] == "delta" and report["combination"]["method"] == method
    assert all(a["parity"]["passed"] for a in report["artifacts"])
    assert "mergekit's definition" in report["parity_reference"]
    if method == "ties":  # the pruning left about 1 - density of each combined delta at zero
        sparsity = report["combination"]["per_module_sparsity"]
        assert set(sparsity) >= {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_in_delta_space_matches_mergekit_by_its_statistics(parts, tmp_path, method):
    """DARE at density 0.5: what share of each combined delta is kept, and its L1 norm, agree with mergekit's run to
    a few percent (masks are random on both sides; the tensors here hold 4096-11008 values)."""
    base, adapters, models, base64 = parts
    base_state = load_output(base)
    mine = ours(base, adapters, tmp_path / "ours", method, 0.5, seed=11)
    torch.manual_seed(0)
    theirs = mergekit_merge(base64, models, tmp_path / "mergekit", method, 0.5)
    for name in mine:
        if not name.endswith("_proj.weight") or torch.equal(mine[name], base_state[name].float()):
            continue
        delta_mine = mine[name].double() - base_state[name].double()
        delta_theirs = theirs[name] - base_state[name].double()
        kept_mine = float((delta_mine.abs() > 1e-9).double().mean())
        kept_theirs = float((delta_theirs.abs() > 1e-9).double().mean())
        assert abs(kept_mine - kept_theirs) < 0.05, (name, kept_mine, kept_theirs)
        l1_mine, l1_theirs = float(delta_mine.abs().sum()), float(delta_theirs.abs().sum())
        assert abs(l1_mine / l1_theirs - 1) < 0.1, (name, l1_mine, l1_theirs)


def test_dare_keeps_about_density_and_rescales_to_the_l1_norm(parts, tmp_path):
    """By hand, on v_proj (only a1 adapts it, so the combined delta is a1's alone): about half of ΔW₁'s values
    survive, each as 0.7·c·ΔW₁ with one c per tensor, and c restores ΔW₁'s L1 norm (mergekit's rescale). The same
    seed gives the same masks; another seed others."""
    base, adapters, models, base64 = parts
    name = "model.layers.0.self_attn.v_proj.weight"
    delta1 = (load_file(models[0] / "model.safetensors")[name] - load_file(base64 / "model.safetensors")[name]).float()
    runs = {}
    for label, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / label
        combine = CombineSpec("dare_linear", WEIGHTS, density=0.5, seed=seed, space="delta")
        run_pipeline(ExportPlan(base=str(base), adapter=str(adapters[0]), more_adapters=(str(adapters[1]),),
                                combine=combine, out=out, dtype="float32", parity=False, progress=False))
        runs[label] = load_output(out)[name].double() - load_output(base)[name].double()
    delta = runs["a"]
    kept = delta.abs() > 1e-9
    assert 0.45 < float(kept.double().mean()) < 0.55
    c = float((delta[kept] / delta1.double()[kept]).median())
    # (the merged weight is W + ΔW rounded to float32: recovered deltas carry that rounding, relative to W)
    assert torch.allclose(delta[kept], c * delta1.double()[kept], rtol=1e-5, atol=1e-7)
    l1_kept = float(delta1.double()[kept].abs().sum())
    assert c == pytest.approx(0.7 * float(delta1.double().abs().sum()) / l1_kept, rel=1e-4)
    assert torch.equal(runs["a"], runs["b"]) and not torch.equal(runs["a"], runs["c"])


def test_delta_space_choices_that_cannot_be_made_are_refused(parts, tmp_path):
    base, adapters, _, _ = parts
    common = dict(base=str(base), adapter=str(adapters[0]), more_adapters=(str(adapters[1]),), out=tmp_path / "o")
    with pytest.raises(ExportError, match="is not a delta-space method"):
        ExportPlan(**common, combine=CombineSpec("svd", space="delta"))
    with pytest.raises(ExportError, match="task arithmetic works on the full deltas"):
        ExportPlan(**common, combine=CombineSpec("task_arithmetic", space="adapter"))
    with pytest.raises(ExportError, match="--majority-sign-method frequency"):
        ExportPlan(**common, combine=CombineSpec("ties", density=0.5, majority_sign_method="frequency", space="delta"))
    with pytest.raises(ExportError, match="no adapter holds"):
        ExportPlan(**common, combine=CombineSpec("task_arithmetic"), formats=("gguf-lora",))
    assert not (tmp_path / "o").exists()


def cli_run(base, adapters, out, *flags: str) -> None:
    from click.testing import CliRunner

    from exporter.cli import main

    result = CliRunner().invoke(main, ["-q", "run", "--base", str(base), "--adapter", f"{adapters[0]},{adapters[1]}",
                                       "--weights", ",".join(map(str, WEIGHTS)), *flags, "--dtype", "float32",
                                       "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output


def test_the_cli_combines_in_delta_space(parts, tmp_path):
    base, adapters, models, base64 = parts
    cli_run(base, adapters, tmp_path / "task_arithmetic", "--combine", "task_arithmetic")  # delta space implied
    cli_run(base, adapters, tmp_path / "ties", "--combine", "ties", "--combine-space", "delta", "--density", "0.5")
    for method, density in (("task_arithmetic", None), ("ties", 0.5)):
        theirs = mergekit_merge(base64, models, tmp_path / f"mergekit-{method}", method, density)
        assert_close(load_output(tmp_path / method), theirs, load_output(base))
