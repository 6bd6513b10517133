"""Several adapters into one model (exporter/combine.py): every PEFT combination type against PEFT itself
(add_weighted_adapter, then merge_and_unload, in float32), sum against merge_and_unload(adapter_names=[…]), parity
against the right reference, and one clear error for each combination that cannot be made.

The base is a bf16 llama as users have one; the adapters are trained a few steps each (different targets, ranks,
α and learning rates), so every scale and every union of modules counts.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import build_bf16_llama, build_peft_adapter, load_output, train_adapter
from exporter.cli import main
from exporter.combine import ADAPTER_METHODS, METHODS, CombineSpec
from exporter.context import ExportPlan
from exporter.errors import ExportError
from exporter.pipeline import run_pipeline

PEFT_METHODS = [m for m in ADAPTER_METHODS if m != "sum"]
EQUAL_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd", "dare_ties_svd",
           "magnitude_prune_svd")
WEIGHTS = (0.7, -0.4)  # a negative weight: subtraction is a documented use, and signs are where methods differ


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(bf16 base, {name: trained adapter}): a1 and a2 share rank 8 with different α, targets and training; a3 is
    rank 4."""
    root = tmp_path_factory.mktemp("combine")
    base = build_bf16_llama(root / "base")
    adapters = {
        "a1": train_adapter(root / "a1", base, r=8, lora_alpha=16, tokenizer=True,
                            target_modules=["q_proj", "v_proj", "up_proj"]),
        "a2": train_adapter(root / "a2", base, r=8, lora_alpha=32, lr=1e-2, steps=5, tokenizer=True,
                            target_modules=["q_proj", "k_proj", "down_proj"]),
        "a3": train_adapter(root / "a3", base, r=4, lora_alpha=8, lr=1e-2, steps=5, tokenizer=True,
                            target_modules=["q_proj", "o_proj"]),
    }
    return base, adapters


def peft_merged(base, adapters: dict, names: list[str], method: str | None, weights=None, **kwargs) -> dict:
    """PEFT's merged state dict in float32: add_weighted_adapter(method) then merge_and_unload, or (method None)
    merge_and_unload(adapter_names=names). DARE's masks come from torch's global generator: seeded as --seed is."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    if method is None:
        return {k: v.clone() for k, v in peft.merge_and_unload(adapter_names=names).state_dict().items()}
    torch.manual_seed(kwargs.pop("seed", 0))
    peft.add_weighted_adapter(names, list(weights), "combined", combination_type=method, **kwargs)
    return {k: v.clone() for k, v in peft.merge_and_unload(adapter_names=["combined"]).state_dict().items()}


def run(base, adapters: list, out, spec: CombineSpec | None, **plan) -> object:
    plan.setdefault("progress", False)
    return run_pipeline(ExportPlan(base=str(base), adapter=str(adapters[0]),
                                   more_adapters=tuple(str(a) for a in adapters[1:]), combine=spec, out=out, **plan))


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_peft_combination_merges_to_what_peft_merges(parts, tmp_path, method):
    """--combine METHOD with PEFT's parameters: every merged tensor equals PEFT's add_weighted_adapter +
    merge_and_unload bit for bit in float32 (DARE's random masks included: the same seed gives PEFT's masks), and
    parity against the combined adapter applied on the fly passes."""
    base, adapters = parts
    names = ["a1", "a2"] if method in EQUAL_RANK else ["a1", "a3"]  # different ranks where the method takes them
    params = {"density": 0.5} if method in PRUNING else {}
    if method.startswith("dare"):
        params["seed"] = 7
    if method == "svd":
        params.update(svd_rank=6, svd_clamp=0.99)
    spec = CombineSpec(method, WEIGHTS, **params)
    ctx = run(base, [adapters[n] for n in names], tmp_path / "out", spec, dtype="float32")
    assert all(a.parity.passed for a in ctx.artifacts), [a.parity for a in ctx.artifacts]

    peft_params = {k: v for k, v in params.items()}
    theirs = peft_merged(base, adapters, names, method, WEIGHTS, **peft_params)
    ours = load_output(tmp_path / "out")
    assert set(ours) == set(theirs)
    differ = [n for n in ours if not torch.equal(ours[n], theirs[n])]
    assert not differ, differ
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    combination = report["combination"]
    assert combination["method"] == method and combination["weights"] == list(WEIGHTS)
    assert combination["adapters"] == [str(adapters[n]) for n in names]
    if method in PRUNING:
        assert combination["density"] == 0.5 and combination["per_module_sparsity"]
    if method.startswith("dare"):
        assert combination["seed"] == 7
    # cat is exactly the weighted sum: checked against every input adapter applied on the fly, not PEFT's definition
    expected = "every adapter (cat of 2, each with its weight)" if method == "cat" else "the combined adapter"
    assert expected in report["parity_reference"]


def test_sum_is_what_merge_and_unload_merges_for_several_adapters(parts, tmp_path):
    """sum with the default weights: PEFT's merge_and_unload(adapter_names=[a1, a2, a3]) (each adapter merged in
    turn), to float32 rounding (one sum instead of three additions); the reference applies each adapter on the fly."""
    base, adapters = parts
    names = ["a1", "a2", "a3"]
    ctx = run(base, [adapters[n] for n in names], tmp_path / "out", CombineSpec("sum"), dtype="float32")
    assert all(a.parity.passed for a in ctx.artifacts)
    theirs = peft_merged(base, adapters, names, None)
    ours = load_output(tmp_path / "out")
    base_state = load_output(base)
    for name, tensor in ours.items():
        change = (theirs[name] - base_state[name].float()).abs().max()
        assert torch.allclose(tensor, theirs[name], rtol=0, atol=1e-6 + 1e-5 * float(change)), name
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["combination"]["rank"] == 8 + 8 + 4
    assert "every adapter (sum of 3, each with its weight) applied on the fly" in report["parity_reference"]


def test_an_adapter_combined_with_itself_at_half_weights_is_that_adapter(parts, tmp_path):
    """a1 at 0.5 plus a1 at 0.5 merges to a1 alone, as PEFT merges it (to float32 rounding)."""
    base, adapters = parts
    run(base, [adapters["a1"], adapters["a1"]], tmp_path / "out", CombineSpec("sum", (0.5, 0.5)), dtype="float32")
    theirs = peft_merged(base, adapters, ["a1"], None)
    for name, tensor in load_output(tmp_path / "out").items():
        assert torch.allclose(tensor, theirs[name], rtol=1e-6, atol=1e-7), name
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    kept = report["artifacts"][0]["parity"]["effect_kept_per_adapter"]
    assert list(kept.values()) == [pytest.approx(1.0, abs=1e-4)]  # a1 twice: one name, all of its effect


def test_each_adapters_effect_kept_is_reported(parts, tmp_path):
    """Hand-computed ends of the scale: a1 at weight 1 beside a2 at weight 0 is a1 alone, so a1 keeps all its
    effect (1) whatever a2 keeps; report.json and the parity table name both adapters."""
    base, adapters = parts
    ctx = run(base, [adapters["a1"], adapters["a2"]], tmp_path / "out", CombineSpec("sum", (1.0, 0.0)),
              dtype="float32")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    kept = report["artifacts"][0]["parity"]["effect_kept_per_adapter"]
    assert list(kept) == ["a1", "a2"]  # the folders' names
    assert kept["a1"] == pytest.approx(1.0, abs=1e-4)
    assert kept["a2"] < 0.9
    table = ctx.parity.table
    assert "each adapter's effect kept" in table and "a1 100%" in table


@pytest.mark.parametrize("method", ["sum", "ties", "svd"])
def test_to_peft_writes_the_combined_adapter_peft_loads(parts, tmp_path, method):
    """--to peft: PEFT loads the folder on the float32 base, and its unmerged logits equal our merged model's; the
    adapter is r = α = the combined rank, as PEFT's own combined adapter is; parity judged it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapters = parts
    names = ["a1", "a3"] if method != "ties" else ["a1", "a2"]
    spec = CombineSpec(method, WEIGHTS, density=0.5 if method == "ties" else None)
    ctx = run(base, [adapters[n] for n in names], tmp_path / "out", spec, dtype="float32",
              formats=("safetensors", "peft"))
    assert [a.format for a in ctx.artifacts] == ["safetensors", "peft"] and all(a.parity.passed for a in ctx.artifacts)
    folder = tmp_path / "out" / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == ctx.combination["rank"]
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 7]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs, ours = peft(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(theirs, ours, rtol=0, atol=2e-5), float((theirs - ours).abs().max())


def test_to_peft_needs_a_combination_in_adapter_space(parts, tmp_path):
    base, adapters = parts
    code, errors = _cli_error("--base", str(base), "--adapter", str(adapters["a1"]), "--to", "peft",
                              "--out", str(tmp_path / "one"))
    assert code == 2 and "nothing to combine" in errors[0], errors
    code, errors = _cli_error("--base", str(base), "--adapter", f"{adapters['a1']},{adapters['a2']}", "--to", "peft",
                              "--combine", "task_arithmetic", "--out", str(tmp_path / "delta"))
    assert code == 2 and "no adapter holds" in errors[0], errors
    assert not (tmp_path / "one").exists() and not (tmp_path / "delta").exists()


def test_the_cli_takes_repeated_or_comma_listed_adapters(parts, tmp_path):
    base, adapters = parts
    common = ["-q", "run", "--base", str(base), "--parity", "off", "--no-progress", "--combine", "sum",
              "--weights", "1,0.5", "--dtype", "float32"]
    repeated = CliRunner().invoke(main, [*common, "--adapter", str(adapters["a1"]), "--adapter", str(adapters["a3"]),
                                         "--out", str(tmp_path / "repeated")])
    listed = CliRunner().invoke(main, [*common, "--adapter", f"{adapters['a1']},{adapters['a3']}",
                                       "--out", str(tmp_path / "listed")])
    assert repeated.exit_code == listed.exit_code == 0, repeated.output + listed.output
    first, second = load_output(tmp_path / "repeated"), load_output(tmp_path / "listed")
    assert all(torch.equal(first[n], second[n]) for n in first)
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert "--adapter ./task-lora --adapter ./style-lora --combine sum" in help_text


def test_every_combination_flag_reaches_the_method(parts, tmp_path):
    """--density, --majority-sign-method, --seed, --svd-rank and --svd-clamp from the command line: the merged model
    is PEFT's for those parameters (a flag that did not reach the method would change the result)."""
    base, adapters = parts
    params = dict(density=0.6, majority_sign_method="frequency", seed=5, svd_rank=5, svd_clamp=0.9)
    result = CliRunner().invoke(main, [
        "-q", "run", "--base", str(base), "--adapter", f"{adapters['a1']},{adapters['a3']}", "--no-progress",
        "--combine", "dare_ties_svd", "--weights", ",".join(map(str, WEIGHTS)), "--density", "0.6",
        "--majority-sign-method", "frequency", "--seed", "5", "--svd-rank", "5", "--svd-clamp", "0.9",
        "--dtype", "float32", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    theirs = peft_merged(base, adapters, ["a1", "a3"], "dare_ties_svd", WEIGHTS, **params)
    ours = load_output(tmp_path / "out")
    assert not [n for n in ours if not torch.equal(ours[n], theirs[n])]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["combination"]["rank"] == 5


def test_dare_is_reproducible_by_its_seed(parts, tmp_path):
    base, adapters = parts
    outputs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(base, [adapters["a1"], adapters["a2"]], tmp_path / name,
            CombineSpec("dare_linear", WEIGHTS, density=0.5, seed=seed), parity=False)
        outputs[name] = load_output(tmp_path / name)
    adapted = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(outputs["a"][n], outputs["b"][n]) for n in outputs["a"])
    assert not torch.equal(outputs["a"][adapted], outputs["c"][adapted])


def _cli_error(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["run", "--no-progress", *args])
    return result.exit_code, [line for line in result.output.splitlines() if line.startswith("error:")]


def test_several_adapters_without_a_method_are_refused_listing_the_methods(parts, tmp_path):
    base, adapters = parts
    code, errors = _cli_error("--base", str(base), "--adapter", str(adapters["a1"]), "--adapter",
                              str(adapters["a2"]), "--out", str(tmp_path / "out"))
    assert code == 2 and len(errors) == 1, errors
    assert "--adapter" in errors[0] and all(m in errors[0] for m in METHODS), errors
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["ranks", "density", "weights", "bases", "dora"])
def test_combinations_that_cannot_be_made_are_one_error_naming_what(parts, tmp_path, case):
    base, adapters = parts
    chosen, extra = [adapters["a1"], adapters["a2"]], ["--combine", "ties", "--density", "0.5"]
    words: tuple[str, ...]
    if case == "ranks":  # linear needs one rank: both adapters and their ranks are named
        chosen, extra = [adapters["a1"], adapters["a3"]], ["--combine", "linear"]
        words = ("one rank", f"{adapters['a1']} r=8", f"{adapters['a3']} r=4")
    elif case == "density":
        extra, words = ["--combine", "ties"], ("--combine ties", "--density")
    elif case == "weights":
        extra, words = ["--combine", "sum", "--weights", "1,2,3"], ("--weights", "3 weights for 2 adapters")
    elif case == "bases":
        other = tmp_path / "other"
        import shutil

        shutil.copytree(adapters["a2"], other)
        config = json.loads((other / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "org/another-model"
        (other / "adapter_config.json").write_text(json.dumps(config))
        chosen, words = [adapters["a1"], other], ("different base models", "org/another-model")
    else:
        dora = build_peft_adapter(tmp_path / "dora", base, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
        chosen, extra, words = [adapters["a1"], dora], ["--combine", "sum"], ("DoRA",)
    args = [x for a in chosen for x in ("--adapter", str(a))]
    code, errors = _cli_error("--base", str(base), *args, *extra, "--out", str(tmp_path / "out"))
    assert code == 2 and len(errors) == 1, errors
    assert all(w in errors[0] for w in words), (words, errors)
    assert not (tmp_path / "out").exists()


def test_a_plan_with_combine_checks_its_parameters():
    with pytest.raises(ExportError, match="--density 1.5"):
        ExportPlan(base="b", adapter="a", more_adapters=("c",), combine=CombineSpec("ties", density=1.5), out="o")
    with pytest.raises(ExportError, match="--combine median"):
        ExportPlan(base="b", adapter="a", more_adapters=("c",), combine=CombineSpec("median"), out="o")


def test_gguf_lora_keeps_several_adapters_apart_one_file_each(parts, tmp_path):
    """Several adapters without --combine, asked only for gguf-lora: one GGUF LoRA per adapter, each applied by
    llama.cpp to the base and judged against the base with that adapter alone (a file judged against another
    adapter's reference would fail: a1 and a3 adapt different modules)."""
    base, adapters = parts
    ctx = run(base, [adapters["a1"], adapters["a3"]], tmp_path / "out", None, formats=("gguf-lora",))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.gguf")) == ["adapter-a1.gguf", "adapter-a3.gguf"]
    assert [a.path.name for a in ctx.artifacts] == ["adapter-a1.gguf", "adapter-a3.gguf"]
    assert all(a.parity.passed and a.parity.figures.max_abs < 1e-3 for a in ctx.artifacts), \
        [a.parity for a in ctx.artifacts]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(f"the adapter {name} applied" in report["parity_reference"] for name in ("a1", "a3"))
    # asked for a merged format too, the same adapters need --combine
    code, errors = _cli_error("--base", str(base), "--adapter", f"{adapters['a1']},{adapters['a3']}",
                              "--to", "gguf-lora,safetensors", "--out", str(tmp_path / "both"))
    assert code == 2 and "one file each" in errors[0], errors
