"""--to onnx end to end: a bf16 base and an adapter trained on it, merged and exported, run by ONNX Runtime and
onnxruntime-genai. Oracles: transformers on the same merge (saved as float32 safetensors in the same run), its greedy
decoding, ONNX Runtime's full recompute, onnxruntime-genai's own generator, and onnx's operator list."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from conftest import build_peft_adapter, train_adapter
from exporter.cli import main

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, bos_token_id=0,
            eos_token_id=1, pad_token_id=2)
# Sliding windows of 8 under 16-token probes; Gemma at initializer_range 0.15 repeats one token forever (its scaled
# tied embedding dominates), 0.02 varies.
ARCHS = {
    "llama": {}, "mistral": dict(sliding_window=8), "qwen2": {}, "qwen3": dict(head_dim=16), "phi3": {},
    "gemma2": dict(head_dim=16, sliding_window=8, initializer_range=0.02),
    "gemma3_text": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        initializer_range=0.02),
}
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY_STEPS = 8


def bf16_base(folder: Path, arch: str, tokenizer: bool = False) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    if tokenizer:
        from exporter.demo import build_tokenizer

        build_tokenizer(folder, vocab_size=128, family="llama-bpe")
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **{**TINY, **ARCHS[arch]})
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def cli(*args: str):
    return CliRunner().invoke(main, ["-q", "run", "--no-progress", *args])


def ort_greedy(model: Path, prompt: list[int], steps: int) -> list[int]:
    from exporter.formats.onnx import _run, _session

    session = _session(model)
    logits, past = _run(session, prompt, None, len(prompt))
    tokens = [int(logits[-1].argmax())]
    for i in range(steps - 1):
        logits, past = _run(session, [tokens[-1]], past, len(prompt) + i + 1)
        tokens.append(int(logits[-1].argmax()))
    return tokens


def hf_greedy(folder: Path, prompt: list[int], steps: int) -> list[int]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_runs_in_onnx_runtime_like_the_unmerged_model(tmp_path, arch):
    base = bf16_base(tmp_path / "base", arch)
    adapter = train_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16,
                            target_modules=TARGETS.get(arch, DEFAULT_TARGETS))
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--dtype", "float32",
                 "--to", "safetensors,onnx:fp32,onnx:fp16")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    parity = {a["parity"]["dtype"]: a["parity"] for a in report["artifacts"] if a["format"] == "onnx"}
    # Measured on these fixtures: fp32 max|Δ| ≤ 1e-5 (declared 1e-3), fp16 KL ≤ 1e-5 (declared 1e-3); the KV-cache
    # decode equals the recompute within 5e-6 in fp32.
    assert parity["fp32"]["passed"] and parity["fp32"]["max_abs"] <= 1e-4
    assert parity["fp16"]["passed"] and parity["fp16"]["kl"] <= 1e-4
    assert parity["fp32"]["kv_cache"]["max_abs_vs_recompute"] <= 2e-5 and parity["fp32"]["kv_cache"]["decode_steps"] == 8
    assert parity["fp32"]["adapter_effect_kept"] > 0.99
    prompt = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    ours = ort_greedy(tmp_path / "out" / "onnx-fp32" / "model.onnx", prompt, GREEDY_STEPS)
    assert ours == hf_greedy(tmp_path / "out", prompt, GREEDY_STEPS)  # the float32 merge, run by transformers
    census = {op for op in json.loads(json.dumps(_census(tmp_path / "out" / "onnx-fp32" / "model.onnx")))}
    assert census and all(op.startswith("ai.onnx::") for op in census), census  # TensorRT's parser takes these


def _census(path: Path) -> dict[str, int]:
    from converters.onnx import operator_census

    return operator_census(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_onnxruntime_genai_generates_what_transformers_generates(tmp_path, arch):
    import onnxruntime_genai as og

    base = bf16_base(tmp_path / "base", arch, tokenizer=True)
    adapter = train_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=DEFAULT_TARGETS)
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--dtype", "float32",
                 "--to", "safetensors,onnx")
    assert result.exit_code == 0, result.output
    model = og.Model(str(tmp_path / "out" / "onnx"))
    prompt = torch.randint(3, 128, (10,), generator=torch.Generator().manual_seed(9)).tolist()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + GREEDY_STEPS)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    expected = hf_greedy(tmp_path / "out", prompt, GREEDY_STEPS)
    eos = TINY["eos_token_id"]
    if eos in expected:  # genai stops at EOS, as it runs by default
        expected = expected[: expected.index(eos) + 1]
    assert tokens == expected


def test_the_folder_carries_provenance_and_figures(tmp_path):
    base = bf16_base(tmp_path / "base", "llama", tokenizer=True)
    adapter = train_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    assert cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to",
               "onnx:fp16").exit_code == 0
    folder = tmp_path / "out" / "onnx"
    assert {"model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "genai_config.json"} <= {p.name for p in folder.iterdir()}
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    import hashlib

    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert props["lora_export.sha256.adapter_model.safetensors"] == digest
    assert "lora_export.version" in props and json.loads(props["lora_export.parity"])["passed"] is True
    assert all(i.name in {"input_ids", "attention_mask", "position_ids"} or i.name.startswith("past_key_values.")
               for i in model.graph.input)
    assert folder.stat().st_size < 2**31 and (folder / "model.onnx").stat().st_size < 2**20  # weights outside
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(int64)" and session.get_outputs()[0].type == "tensor(float16)"


def test_bf16_and_an_architecture_the_exporter_cannot_handle_are_refused_before_the_merge(tmp_path, monkeypatch):
    import exporter.stages.merge as merge_stage
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the merge started before a pre-flight refusal")

    monkeypatch.setattr(merge_stage, "LoraMerge", Refuse)
    base = bf16_base(tmp_path / "base", "llama")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    bf16 = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to", "onnx:bf16")
    assert bf16.exit_code == 2 and "no bf16 kernels" in bf16.output and not (tmp_path / "out").exists()

    moe = tmp_path / "moe"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2MoeConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2,
                                                       "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
                                                    )).save_pretrained(moe)
    moe_adapter = build_peft_adapter(tmp_path / "moe-adapter", moe, r=4, lora_alpha=8, target_modules=["q_proj"])
    refused = cli("--base", str(moe), "--adapter", str(moe_adapter), "--out", str(tmp_path / "out"), "--to", "onnx")
    assert refused.exit_code == 2, refused.output
    line = [x for x in refused.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "qwen2_moe" in line[0] and "Fix:" in line[0]
    assert not (tmp_path / "out").exists()


def test_a_refusal_after_the_onnx_pre_flight_leaves_no_file_open(tmp_path):
    """The ONNX pre-flight opens its data file; when a later check refuses the run (here GGUF: no tokenizer), the
    writer is closed with the rest, not leaked until the process ends."""
    import os

    base = bf16_base(tmp_path / "base", "llama")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to", "onnx,gguf")
    assert result.exit_code == 2 and "holds no tokenizer" in result.output, result.output
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.islink(f"/proc/self/fd/{fd}")]
    assert not [f for f in open_files if "model.onnx" in f], open_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no output, no staging, no lock


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_the_disk_pre_flight_plans_the_bytes_the_data_file_takes(tmp_path, arch):
    """The size the disk check plans for equals what model.onnx.data holds, give or take the 4 KiB alignment of each
    tensor: tied embeddings (Gemma) add the output head's transposed copy once, not a second copy of everything."""
    from exporter.context import ExportPlan
    from exporter.formats.onnx import FORMAT
    from exporter.pipeline import run_pipeline

    base = bf16_base(tmp_path / "base", arch)
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    ctx = run_pipeline(ExportPlan(base=str(base), adapter=str(adapter), out=tmp_path / "out", formats=("onnx",),
                                  parity="off", progress=False))
    planned, _ = FORMAT.output_bytes(ctx, "fp32")
    written = (tmp_path / "out" / "onnx" / "model.onnx.data").stat().st_size
    tensors = len(onnx.load(str(tmp_path / "out" / "onnx" / "model.onnx"), load_external_data=False).graph.initializer)
    assert planned <= written <= planned + 4096 * tensors, (planned, written, tensors)
    assert ctx.merged_config.get("tie_word_embeddings", False) == (arch == "gemma3_text")
