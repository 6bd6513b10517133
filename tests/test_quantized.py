"""Quantized bases in and out: a bitsandbytes base (NF4 / FP4 / int8, quantized and saved by transformers itself)
merged with a QLoRA adapter trained by PEFT on it, and the merge re-quantized with bitsandbytes.

Oracles: transformers' own dequantize() of the loaded (never run) 4-bit model with PEFT's merge_and_unload and
PEFT's unmerged forward on it; transformers' quantize-on-load + save_pretrained of our float output, and of PEFT's
own merge (every --to safetensors:<variant> from a bf16 base); transformers' loading of our quantized folder.
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
# The device --device auto merges (and so quantizes) on; transformers quantizes on the device it loads to.
RUN_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantize_with_transformers(float_dir: Path, out: Path, device_map: str = "cpu", **bnb_kwargs) -> Path:
    """What users download as a *-bnb-4bit folder: transformers quantizes on load and saves (no forward run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(**bnb_kwargs),
                                                 device_map=device_map)
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
    # the rest of PEFT's merged model (embeddings, norms, head) was stored as float: 2 layers x 2 norms + 3
    assert report["dequantize"]["float_tensors"] == len(peft) - 14 == 7
    # the type as the quantized base's config.json (written by transformers) describes it
    written = json.loads((quantized / "config.json").read_text())["quantization_config"]
    described = ("int8 (LLM.int8)" if written.get("load_in_8bit") else
                 written["bnb_4bit_quant_type"] + (" + double quant" if written["bnb_4bit_use_double_quant"] else ""))
    assert report["dequantize"]["type"] == described
    assert "what QLoRA training computed with" in report["parity_reference"]
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_reference_is_the_unmerged_qlora_model(qlora, kind):
    from exporter.base import load_base
    from exporter.parity.layerwise import probe_logits
    from exporter.parity.reference import BaseModelTensors, load_reference

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
    # quantized on the device the run merged on (--device auto), as the pipeline does
    theirs_dir = quantize_with_transformers(tmp_path / "out", tmp_path / "transformers-nf4", device_map=RUN_DEVICE,
                                            load_in_4bit=True, bnb_4bit_quant_type="nf4")
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


@pytest.mark.parametrize("kind", sorted(QUANTIZATIONS))
def test_an_original_that_does_not_match_is_refused(qlora, tmp_path, kind):
    """Every quantized weight of --original-base re-quantized as the base was (4-bit: its quant state; int8: row
    scales) gives the stored codes: the true original passes, one weight nudged is named."""
    float_dir, quantized, adapter = qlora[kind]
    accepted = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "ok"),
                   "--original-base", str(float_dir), "--merge-into", "original", "--parity", "off")
    assert accepted.exit_code == 0, accepted.output
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


def test_an_original_missing_a_tensor_or_of_another_shape_is_refused_naming_exactly_those(qlora, tmp_path):
    """The load stage's name-and-shape check of --original-base, before the dequantize stage compares values."""
    float_dir, quantized, adapter = qlora["nf4-dq"]
    other = Path(shutil.copytree(float_dir, tmp_path / "other"))
    tensors = load_file(other / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    result = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--original-base", str(other), "--merge-into", "original")
    assert result.exit_code == 2, result.output
    error = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert "'model.layers.0.mlp.down_proj.weight' is missing" in error
    width = tensors["model.norm.weight"].shape[0] + 1
    assert f"'model.norm.weight' is ({width - 1},), the quantized base's ({width},)" in error
    assert error.count("'model.") == 2, error  # exactly those two, no tensor that matches
    assert not (tmp_path / "out").exists()


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


# --- --to safetensors:<bitsandbytes variant> from a float base ------------------------------------------------------

# The test's own table, written as users write BitsAndBytesConfig (independent of exporter/formats/bnb.py VARIANTS).
REQUANTIZED = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
PROBE_SENTENCES = ["The capital of Italy is Rome.", "Hello! How are you today?",
                   "def add(a, b):\n    return a + b", "Once upon a time there was a fisherman by the sea."]


@pytest.fixture(scope="module")
def bf16_lora(tmp_path_factory):
    """(bf16 base, adapter trained on it, PEFT's float32 merge_and_unload cast to bf16 and saved)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bf16-lora")
    base = build_bf16_llama(root / "base")
    adapter = train_adapter(root / "adapter", base, r=8, lora_alpha=16, tokenizer=True, target_modules=TARGETS)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # transformers casts the checkpoint to the model dtype (bf16 here) before it quantizes on load
    PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16).save_pretrained(root / "merged")
    return base, adapter, root / "merged"


def _bnb_dequantized(model) -> dict[str, torch.Tensor]:
    """Every bitsandbytes Linear's weight as bitsandbytes dequantizes it (transformers' own helper), on the CPU."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    return {name: dequantize_bnb_weight(m.weight, getattr(m, "state", None)).cpu()
            for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def _kl_and_decisive_top1(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref‖out) over positions, and top-1 agreement where the reference's top-2 margin is ≥ 1 logit."""
    log_ref, log_out = ref.double().log_softmax(-1), out.double().log_softmax(-1)
    kl = float((log_ref.exp() * (log_ref - log_out)).sum(-1).mean())
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= 1.0
    top1 = float((ref.argmax(-1) == out.argmax(-1))[decisive].double().mean()) if decisive.any() else 1.0
    return kl, top1


@pytest.mark.parametrize("variant", sorted(REQUANTIZED))
def test_requantized_output_is_bitsandbytes_of_the_peft_merge(bf16_lora, tmp_path, variant):
    """--to safetensors:<variant> with default flags from a bf16 base: the folder loads with no arguments as the
    requested quantization, its weights are bitsandbytes' quantization of PEFT's merge (transformers quantizing the
    merge on load), and its logits hold the variant's declared bound against PEFT's unmerged model."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from conftest import model_logits, peft_unmerged_logits

    base, adapter, peft_merged = bf16_lora
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to",
                 f"safetensors:{variant}")
    assert result.exit_code == 0, result.output
    expected = REQUANTIZED[variant]
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / variant).eval()

    # (a) the quantization transformers reads from the folder, and the modules it built from it
    config = ours.config.quantization_config
    four_bit = expected.get("load_in_4bit", False)
    assert (config.load_in_4bit, config.load_in_8bit) == (four_bit, not four_bit)
    linears = {n: m for n, m in ours.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    assert len(linears) == 14
    if four_bit:
        assert config.bnb_4bit_quant_type == expected["bnb_4bit_quant_type"]
        assert config.bnb_4bit_use_double_quant == expected["bnb_4bit_use_double_quant"]
        for name, module in linears.items():
            assert isinstance(module, bnb.nn.Linear4bit), name
            state = module.weight.quant_state
            assert state.quant_type == expected["bnb_4bit_quant_type"], name
            assert (state.state2 is not None) == expected["bnb_4bit_use_double_quant"], name
    else:
        assert all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in linears.values())

    # (b) bit for bit what bitsandbytes makes of PEFT's float32 merge cast to bf16, quantized where the run merges
    theirs = AutoModelForCausalLM.from_pretrained(peft_merged, quantization_config=BitsAndBytesConfig(**expected),
                                                  device_map=RUN_DEVICE)
    ours_deq, theirs_deq = _bnb_dequantized(ours), _bnb_dequantized(theirs)
    assert set(ours_deq) == set(theirs_deq) == set(linears)
    for name, weight in theirs_deq.items():
        assert ours_deq[name].dtype == weight.dtype and torch.equal(ours_deq[name], weight), name
    merged = load_output(peft_merged)
    floats = {n: t for n, t in ours.state_dict().items() if n in merged and t.is_floating_point()}
    assert set(floats) == set(merged) - {f"{n}.weight" for n in linears}  # embeddings, norms, lm_head
    for name, tensor in floats.items():  # left in float: the merge's bf16 values
        assert torch.equal(tensor.cpu(), merged[name].to(tensor.dtype)), name

    # (c) logits against PEFT's unmerged model (float32), judged by the variant's declared bound (README table)
    tok = AutoTokenizer.from_pretrained(base)
    device = next(ours.parameters()).device
    refs, outs, bases = [], [], []
    for text in PROBE_SENTENCES:
        ids = torch.tensor([tok(text)["input_ids"]])
        refs.append(peft_unmerged_logits(base, adapter, ids)[0])
        bases.append(model_logits(base, ids)[0])  # the base without the adapter
        with torch.no_grad():
            outs.append(ours(input_ids=ids.to(device)).logits[0].float().cpu())
    ref = torch.cat(refs)
    kl, top1 = _kl_and_decisive_top1(ref, torch.cat(outs))
    if four_bit:  # lossy by design: broken only when 1 nat further from the reference than the base is
        adapter_kl, _ = _kl_and_decisive_top1(ref, torch.cat(bases))
        assert kl <= adapter_kl + 1.0, (kl, adapter_kl)
    else:  # LLM.int8: like GGUF q8_0
        assert kl <= 0.05 and top1 >= 0.95, (kl, top1)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    [artifact] = report["artifacts"]
    assert artifact["parity"]["dtype"] == variant and artifact["parity"]["runtime"] == "transformers"
    assert artifact["parity"]["passed"], artifact["parity"]["failures"]
    assert report["requantize"][variant]["quantized_tensors"] == 14

    # (d) how much of each weight's change survives, per tensor: ‖deq(Q(W+ΔW)) − deq(Q(W))‖ / ‖ΔW‖, with ΔW from
    # PEFT's float32 merge and Q(W) what transformers + bitsandbytes make of the base
    from peft import PeftModel

    quantized_base = _bnb_dequantized(AutoModelForCausalLM.from_pretrained(
        base, quantization_config=BitsAndBytesConfig(**expected), device_map=RUN_DEVICE))
    float_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_weights = {n: t.clone() for n, t in float_base.state_dict().items()}
    merged32 = PeftModel.from_pretrained(float_base, adapter).merge_and_unload().state_dict()
    survival = {s["tensor"]: s["kept"] for s in report["requantize"][variant]["per_tensor"]}
    assert set(survival) == {f"{n}.weight" for n in linears}
    for name in linears:
        delta = torch.linalg.vector_norm(merged32[f"{name}.weight"] - base_weights[f"{name}.weight"])
        kept = torch.linalg.vector_norm(ours_deq[name].float() - quantized_base[name].float()) / delta
        assert survival[f"{name}.weight"] == pytest.approx(float(kept), rel=1e-3), name


@pytest.mark.parametrize("variant", ["nf4", "int8"])
def test_the_quantizer_runs_on_the_device_it_is_given(variant):
    """bitsandbytes' CPU and CUDA quantizers are separate code, so the weight must reach the device asked for; on the
    meta device bitsandbytes only works out the output shapes, so a device ignored shows as real CPU tensors."""
    from converters.bnb import quantize_4bit, quantize_int8

    weight = torch.randn(64, 128)
    if variant == "int8":
        parts = quantize_int8("m", weight, model_dtype=torch.bfloat16, conv1d=False, device="meta")
        codes = parts["m.weight"]
        assert codes.shape == (64, 128) and parts["m.SCB"].is_meta
    else:
        parts = quantize_4bit("m", weight, model_dtype=torch.bfloat16, quant_type="nf4", double_quant=False,
                              device="meta")
        codes = parts["m.weight"]
        assert codes.shape == (64 * 128 // 2, 1) and parts["m.weight.absmax"].is_meta
    assert codes.is_meta


@pytest.mark.parametrize("variant", ["nf4-dq", "int8"])
def test_the_pipeline_quantizes_on_the_runs_device(bf16_lora, tmp_path, monkeypatch, variant):
    """The export passes the run's merge device (--device) to bitsandbytes, as transformers quantizes on the device it
    loads to, and writes what comes back (on the CPU)."""
    import converters.bnb

    base, adapter, _ = bf16_lora
    devices = []
    for name in ("quantize_4bit", "quantize_int8"):
        original = getattr(converters.bnb, name)

        def recorder(*args, _original=original, **kwargs):
            devices.append(kwargs.get("device"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(converters.bnb, name, recorder)
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to",
                 f"safetensors:{variant}", "--device", "cpu", "--parity", "off")
    assert result.exit_code == 0, result.output
    assert len(devices) >= 14 and {torch.device(d) if d is not None else None for d in devices} == {
        torch.device("cpu")}


def test_quantized_bases_whose_layers_cannot_be_told_apart_are_refused(qlora, tmp_path):
    """A bitsandbytes GPT-2 (Conv1D layers, stored transposed by bitsandbytes) and a quantized base of an architecture
    transformers does not build are refused by the dequantize stage with one error, nothing written."""
    from conftest import build_peft_adapter, build_tiny_base
    from exporter.demo import build_tokenizer

    float_gpt2 = build_tiny_base(tmp_path / "gpt2", "gpt2", dtype=torch.bfloat16)
    build_tokenizer(float_gpt2, vocab_size=128)
    quantized = quantize_with_transformers(float_gpt2, tmp_path / "gpt2-nf4", load_in_4bit=True,
                                           bnb_4bit_quant_type="nf4")
    adapter = build_peft_adapter(tmp_path / "gpt2-lora", float_gpt2, r=4, lora_alpha=8, target_modules=["c_attn"],
                                 fan_in_fan_out=True)
    result = cli("--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "Conv1D layers" in result.output, result.output
    assert not (tmp_path / "out").exists()

    _, llama_nf4, llama_adapter = qlora["nf4-dq"]
    mystery = Path(shutil.copytree(llama_nf4, tmp_path / "mystery"))
    config = json.loads((mystery / "config.json").read_text())
    (mystery / "config.json").write_text(json.dumps(config | {"model_type": "mystery-llama"}))
    result = cli("--base", str(mystery), "--adapter", str(llama_adapter), "--out", str(tmp_path / "out"),
                 "--parity", "off")  # parity on: refused for that too (parity runs the reference in transformers)
    assert result.exit_code == 2 and "an architecture transformers does not build" in result.output, result.output
    assert not (tmp_path / "out").exists()
