"""Quantized bases in and out: a bitsandbytes base (NF4 / FP4 / int8, quantized and saved by transformers itself)
merged with a QLoRA adapter trained by PEFT on it, and the merge re-quantized with bitsandbytes.

Oracles: transformers' own dequantize() of the loaded (never run) 4-bit model with PEFT's merge_and_unload and
PEFT's unmerged forward on it; transformers' quantize-on-load + save_pretrained of our float output; transformers'
loading of our quantized folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import build_bf16_llama, load_output, train_adapter
from exporter.cli import main

import bitsandbytes  # noqa: E402,F401  (the test extra installs it: a missing install must fail, not skip)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATIONS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


def quantize_with_transformers(float_dir: Path, out: Path, **bnb_kwargs) -> Path:
    """What users download as a *-bnb-4bit folder: transformers quantizes on load and saves (no forward run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(**bnb_kwargs),
                                                 device_map="cpu")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(float_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """{kind: (float base, quantized base, QLoRA adapter trained on the quantized base)}"""
    root = tmp_path_factory.mktemp("qlora")
    float_dir = build_bf16_llama(root / "float")
    cases = {}
    for kind, kwargs in QUANTIZATIONS.items():
        quantized = quantize_with_transformers(float_dir, root / kind, **kwargs)
        adapter = train_adapter(root / f"adapter-{kind}", quantized, r=8, lora_alpha=16, tokenizer=True,
                                target_modules=TARGETS)
        cases[kind] = (float_dir, quantized, adapter)
    return cases


def dequantized_peft(quantized: Path, adapter: Path, kind: str):
    """PEFT on the quantized base as transformers dequantizes it (before any forward), in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu", dtype=torch.bfloat16)
    model.dequantize()
    model = model.float()
    return PeftModel.from_pretrained(model, adapter).eval()


def cli(*args: str):
    return CliRunner().invoke(main, ["-q", "run", "--no-progress", *args])


@pytest.mark.parametrize("kind", sorted(QUANTIZATIONS))
def test_merge_into_the_dequantized_base_equals_peft(qlora, tmp_path, kind):
    _, quantized, adapter = qlora[kind]
    result = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--dtype",
                 "float32")
    assert result.exit_code == 0, result.output
    peft = {k: v.detach() for k, v in dequantized_peft(quantized, adapter, kind).merge_and_unload().state_dict().items()}
    ours = load_output(tmp_path / "out")
    assert set(ours) == set(peft) - {"lm_head.weight"} | ({"lm_head.weight"} & set(ours))
    worst = max((float((t - peft[n]).abs().max()), n) for n, t in ours.items())
    assert worst[0] == 0.0, worst  # bit for bit
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dequantize"]["quantized_tensors"] == {("int8" if kind == "int8" else "4bit"): 14}
    assert "what QLoRA training computed with" in report["parity_reference"]
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_reference_is_the_unmerged_qlora_model(qlora, kind):
    from exporter.base import load_base
    from exporter.layerwise import probe_logits
    from exporter.reference import BaseModelTensors, load_reference

    _, quantized, adapter = qlora[kind]
    probes = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12)]
    ours = probe_logits(load_reference(quantized, adapter, torch.device("cpu"), mode="streamed",
                                       base_tensors=BaseModelTensors(load_base(str(quantized)))), probes,
                        torch.device("cpu"))
    model = dequantized_peft(quantized, adapter, kind)
    with torch.no_grad():
        peft = torch.cat([model(input_ids=p.unsqueeze(0)).logits[0] for p in probes])
    assert (ours - peft).abs().max() <= 1e-5


def test_nf4_output_is_what_transformers_writes_and_loads(qlora, tmp_path):
    """Our safetensors:nf4 folder against transformers' quantize-on-load + save_pretrained of our own float output."""
    from transformers import AutoModelForCausalLM

    _, quantized, adapter = qlora["nf4-dq"]
    result = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to",
                 "safetensors,safetensors:nf4")
    assert result.exit_code == 0, result.output
    theirs_dir = quantize_with_transformers(tmp_path / "out", tmp_path / "transformers-nf4", load_in_4bit=True,
                                            bnb_4bit_quant_type="nf4")
    ours, theirs = load_file(tmp_path / "out" / "nf4" / "model.safetensors"), load_file(theirs_dir / "model.safetensors")
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        if ".quant_state." in key:
            assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(tensor.tolist())), key
        else:
            assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    ours_config = json.loads((tmp_path / "out" / "nf4" / "config.json").read_text())["quantization_config"]
    assert ours_config == json.loads((theirs_dir / "config.json").read_text())["quantization_config"]
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "nf4").eval()(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(theirs_dir).eval()(input_ids=ids).logits
    assert torch.equal(a, b)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    nf4 = next(x["parity"] for x in report["artifacts"] if x["parity"]["dtype"] == "nf4")
    assert nf4["passed"] and nf4["runtime"] == "transformers"
    assert report["requantize"]["nf4"]["quantized_tensors"] == 14 and len(report["requantize"]["nf4"]["per_tensor"]) == 14


def _scaled_adapter(adapter: Path, out: Path, factor: float) -> Path:
    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, out / "adapter_model.safetensors",
              metadata={"format": "pt"})
    return out


def test_an_adapter_nf4_erases_is_flagged(qlora, tmp_path):
    """peft #1043: merged into a 4-bit base and re-quantized, a small adapter can vanish. A normal adapter keeps
    most of its effect; one scaled down 1000x is rounded away and flagged, and fails with --require-effect-kept."""
    _, quantized, adapter = qlora["nf4-dq"]
    normal = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "normal"), "--to",
                 "safetensors:nf4-dq")
    assert normal.exit_code == 0, normal.output
    report = json.loads((tmp_path / "normal" / "report.json").read_text())
    kept = report["artifacts"][0]["parity"]["adapter_effect_kept"]
    assert kept > 0.5 and not [n for n in report["notes"] if "of the adapter's effect" in n]
    tiny = _scaled_adapter(adapter, tmp_path / "tiny-adapter", 1e-3)
    flagged = cli("--base", str(quantized), "--adapter", str(tiny), "--out", str(tmp_path / "tiny"), "--to",
                  "safetensors:nf4-dq", "--accept-parity-failure")
    assert flagged.exit_code == 0
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert report["artifacts"][0]["parity"]["adapter_effect_kept"] < 0.5
    assert [n for n in report["notes"] if "of the adapter's effect" in n]
    assert report["requantize"]["nf4-dq"]["delta_kept_min"] < 0.5  # per tensor: the change is rounded away
    strict = cli("--base", str(quantized), "--adapter", str(tiny), "--out", str(tmp_path / "strict"), "--to",
                 "safetensors:nf4-dq", "--require-effect-kept", "--min-effect-kept", "0.5")
    assert strict.exit_code == 3 and "of the adapter's effect" in strict.output


def test_gguf_from_a_qlora_base(qlora, tmp_path):
    _, quantized, adapter = qlora["nf4-dq"]
    result = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to",
                 "gguf:q4_k_m,gguf:q8_0")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(a["parity"]["passed"] for a in report["artifacts"])
    assert (tmp_path / "out" / "model-Q4_K_M.gguf").is_file()


def test_a_gguf_lora_of_a_qlora_base_is_refused(qlora, tmp_path):
    """llama.cpp applies a GGUF LoRA to a GGUF of the base, which cannot be made from bitsandbytes weights."""
    _, quantized, adapter = qlora["int8"]
    result = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to",
                 "gguf-lora")
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "bitsandbytes-quantized" in lines[0] and "Fix: export the merged model instead: --to gguf." in lines[0]
    assert not (tmp_path / "out").exists()


def test_merge_into_the_original_weights(qlora, tmp_path):
    """--merge-into original: the adapter lands on the full-precision weights (what Unsloth does); judged against
    original + adapter, with the distance to what training saw reported beside it."""
    from conftest import peft_merged_state

    float_dir, quantized, adapter = qlora["nf4-dq"]
    result = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--dtype",
                 "float32", "--original-base", str(float_dir), "--merge-into", "original")
    assert result.exit_code == 0, result.output
    ours, peft = load_output(tmp_path / "out"), peft_merged_state(float_dir, adapter)
    assert all(torch.equal(t, peft[n]) for n, t in ours.items())
    parity = json.loads((tmp_path / "out" / "report.json").read_text())["artifacts"][0]["parity"]
    assert parity["passed"] and parity["kl"] < 1e-8  # against original + adapter
    assert parity["vs_training_reference"]["kl"] > 100 * parity["kl"]  # the quantization error training saw


# --- refusals: one line, exit 2, nothing written --------------------------------------------------------------------

def _break(kind: str):
    def mutate(folder: Path) -> None:
        path = folder / "model.safetensors"
        tensors = load_file(path)
        key = "model.layers.0.self_attn.q_proj.weight"
        if kind == "missing absmax":
            tensors.pop(f"{key}.absmax")
        elif kind == "wrong-shaped absmax":
            tensors[f"{key}.absmax"] = tensors[f"{key}.absmax"][:-1]
        elif kind == "wrong-shaped quant_map":
            tensors[f"{key}.quant_map"] = tensors[f"{key}.quant_map"][:8]
        elif kind in ("corrupt quant state", "unknown quant_type"):
            state_key = next(k for k in tensors if k.startswith(f"{key}.quant_state."))
            text = bytes(tensors[state_key].tolist()).decode()
            text = text[:-5] if kind == "corrupt quant state" else text.replace('"nf4"', '"nf5"')
            tensors[state_key] = torch.tensor(list(text.encode()), dtype=torch.uint8)
        save_file(tensors, path, metadata={"format": "pt"})
    return mutate


@pytest.mark.parametrize("kind", ["missing absmax", "wrong-shaped absmax", "wrong-shaped quant_map",
                                  "corrupt quant state", "unknown quant_type"])
def test_a_broken_quantized_base_is_refused(qlora, tmp_path, kind):
    _, quantized, adapter = qlora["nf4-dq"]
    base = Path(shutil.copytree(quantized, tmp_path / "base"))
    _break(kind)(base)
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "q_proj" in lines[0] and "Fix:" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_an_original_that_does_not_match_is_refused(qlora, tmp_path):
    float_dir, quantized, adapter = qlora["nf4-dq"]
    other = Path(shutil.copytree(float_dir, tmp_path / "other"))
    tensors = load_file(other / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] += 0.01
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    result = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--original-base", str(other), "--merge-into", "original")
    assert result.exit_code == 2 and "model.layers.1.mlp.up_proj.weight" in result.output
    assert "is not the model" in result.output and not (tmp_path / "out").exists()
    lonely = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--merge-into", "original")
    assert lonely.exit_code == 2 and "--original-base" in lonely.output


@pytest.mark.parametrize("method, name", [("awq", "AWQ"), ("fp8", "FP8"), ("hqq", "HQQ"), ("torchao", "torchao"),
                                          ("compressed-tensors", "compressed-tensors")])
def test_other_quantization_methods_are_named_in_the_refusal(qlora, tmp_path, method, name):
    float_dir, _, adapter = qlora["nf4-dq"]
    base = Path(shutil.copytree(float_dir, tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method}
    (base / "config.json").write_text(json.dumps(config))
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and f"describes a {name}-quantized model" in result.output


def test_missing_bitsandbytes_names_the_extra(qlora, tmp_path, monkeypatch):
    import sys

    float_dir, _, adapter = qlora["nf4-dq"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    result = cli("--base", str(float_dir), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to",
                 "safetensors:nf4")
    assert result.exit_code == 2 and "lora-export[bnb]" in result.output and not (tmp_path / "out").exists()
