"""--to onnx end to end: a bf16 base (config.json says "dtype": "bfloat16", as users' bases do) and an adapter trained
on it, merged and exported with default flags, run by ONNX Runtime and onnxruntime-genai. Oracles: PEFT's unmerged
model (base + adapter on the fly, float32) and its greedy decoding, ONNX Runtime driven here step by step with its own
API, onnxruntime-genai's own generator, and onnx's operator list."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from conftest import build_peft_adapter, ort_greedy, peft_unmerged_logits, train_adapter
from exporter.cli import main

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, bos_token_id=0,
            eos_token_id=1, pad_token_id=2)
# Sliding windows of 8 under 16-token probes; Gemma at initializer_range 0.15 repeats one token forever (its scaled
# tied embedding dominates), 0.02 varies. Gemma's hidden size is 48: its embedding scale √48 = 6.928 is not a bf16
# number (√64 = 8 would hide a scale traced in the config's bf16; the real Gemma 3 270M's √640 became 25.25).
ARCHS = {
    "llama": {}, "mistral": dict(sliding_window=8), "qwen2": {}, "qwen3": dict(head_dim=16), "phi3": {},
    "gemma2": dict(hidden_size=48, head_dim=16, sliding_window=8, initializer_range=0.02),
    "gemma3_text": dict(hidden_size=48, head_dim=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"], initializer_range=0.02),
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


def peft_greedy(base: Path, adapter: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding of the unmerged model (PEFT applies the adapter on the fly, float32), recomputed in full at
    every step: nothing of our merge or of ONNX in it."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(peft_unmerged_logits(base, adapter, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_runs_in_onnx_runtime_like_the_unmerged_model(tmp_path, arch):
    base = bf16_base(tmp_path / "base", arch)
    adapter = train_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16,
                            target_modules=TARGETS.get(arch, DEFAULT_TARGETS))
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--to", "safetensors,onnx:fp32,onnx:fp16")  # default flags: the merged safetensors in the base's bf16
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
    assert ours == peft_greedy(base, adapter, prompt, GREEDY_STEPS)
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
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to", "onnx")
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
    expected = peft_greedy(base, adapter, prompt, GREEDY_STEPS)
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


def _ort_logits(model: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one sequence in ONNX Runtime (a prefill from an empty past when the graph has a cache)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    n = ids.shape[-1]
    feed = {"input_ids": ids.numpy()[None], "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None]}
    feed |= {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32 if i.type == "tensor(float)" else np.float16)
             for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    return torch.from_numpy(session.run(["logits"], feed)[0][0].astype(np.float32))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_nocache_variants_end_to_end(tmp_path, arch):
    """onnx:fp32-nocache and onnx:fp16-nocache from a bf16 base with default flags: graphs with only ids, mask and
    positions in and logits out, that ONNX Runtime runs like PEFT's unmerged model."""
    base = bf16_base(tmp_path / "base", arch)
    adapter = train_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=DEFAULT_TARGETS)
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--to", "onnx:fp32-nocache,onnx:fp16-nocache")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    verdicts = {a["parity"]["dtype"]: a["parity"] for a in report["artifacts"]}
    assert set(verdicts) == {"fp32-nocache", "fp16-nocache"} and all(v["passed"] for v in verdicts.values())
    ids = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(11))
    reference = peft_unmerged_logits(base, adapter, ids[None])[0]
    for variant, bound in (("fp32-nocache", 1e-4), ("fp16-nocache", 5e-2)):
        model = tmp_path / "out" / f"onnx-{variant}" / "model.onnx"
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        assert not (model.parent / "genai_config.json").exists()  # onnxruntime-genai needs the cache
        diff = float((_ort_logits(model, ids) - reference).abs().max())
        assert diff < bound, (variant, diff)


def test_a_broken_kv_cache_fails_the_decode_check(tmp_path, monkeypatch):
    """The decode check's failure branch, driven by a corrupted artifact: the graph's first layer returns its keys as
    values and its values as keys. A prefill from an empty past (every logits probe) is untouched, so only the
    prefill + decode vs recompute check can see it: exit 3, the report names it, nothing written."""
    from converters.onnx import writer as onnx_writer

    close = onnx_writer.OnnxWriter.close

    def swap_first_layer_presents(self):
        # The layer's own attention keeps reading its true keys and values (renamed inside the graph); only what it
        # hands out as present.0.* is crossed over, through two Identity nodes.
        graph, inner = self._traced.model.graph, {"present.0.key": "k_inside", "present.0.value": "v_inside"}
        for node in graph.node:
            node.input[:] = [inner.get(name, name) for name in node.input]
            node.output[:] = [inner.get(name, name) for name in node.output]
        graph.node.extend([onnx.helper.make_node("Identity", ["v_inside"], ["present.0.key"]),
                           onnx.helper.make_node("Identity", ["k_inside"], ["present.0.value"])])
        return close(self)

    monkeypatch.setattr(onnx_writer.OnnxWriter, "close", swap_first_layer_presents)
    base = bf16_base(tmp_path / "base", "llama")
    adapter = train_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=DEFAULT_TARGETS)
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--to", "onnx")
    assert result.exit_code == 3, result.output
    failed = json.loads((tmp_path / "out.failed-report.json").read_text())
    [artifact] = failed["artifacts"]
    assert "KV-cache decode differs" in artifact["parity"]["failures"], artifact["parity"]
    assert artifact["parity"]["max_abs"] <= 1e-3  # the logits probes themselves passed
    assert not (tmp_path / "out").exists()
