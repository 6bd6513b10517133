"""One pass, many sinks: every format is cast or quantized once from the float32 merge, the base is read once however
many formats are asked for, and everything a format needs is checked before the merge starts.

Oracles: PEFT's fp32 merge_and_unload, gguf-py's reference quantization (a port of ggml-quants.c), llama.cpp's own
converter's Q/K permutation written out independently (tests/converters/test_gguf_writer.py), and the files of
single-format runs.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader, quants as reference
from gguf.constants import GGMLQuantizationType as QT

from conftest import build_bf16_llama, llama_cpp_permute, peft_merged_state, run_export, train_adapter
from exporter.cli import main

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADS = {"q_proj": 4, "k_proj": 2}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def bf16_case(tmp_path_factory):
    """A bf16 llama with its tokenizer and a PEFT adapter trained a few steps on it (rsLoRA, a rank pattern)."""
    root = tmp_path_factory.mktemp("one-pass")
    base = build_bf16_llama(root / "base")
    adapter = train_adapter(root / "adapter", base, r=8, lora_alpha=16, use_rslora=True, tokenizer=True,
                            target_modules=TARGETS, rank_pattern={"down_proj": 4})
    return base, adapter, peft_merged_state(base, adapter)


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}


def expected_llama_cpp_tensor(peft: dict[str, torch.Tensor], layer: int, proj: str) -> np.ndarray:
    """PEFT's fp32 merge of one projection, laid out as llama.cpp's converter lays it out."""
    part = "self_attn" if proj in HEADS or proj in ("v_proj", "o_proj") else "mlp"
    values = peft[f"model.layers.{layer}.{part}.{proj}.weight"].numpy()
    return llama_cpp_permute(values, HEADS[proj]) if proj in HEADS else values


def test_gguf_from_a_bf16_base_carries_the_fp32_merge(bf16_case, tmp_path):
    base, adapter, peft = bf16_case
    ctx = run_export(base, adapter, tmp_path / "out", formats=("gguf:f32", "gguf:f16", "gguf:q8_0"))
    assert all(a.parity.passed for a in ctx.artifacts)
    f32, f16 = gguf_tensors(tmp_path / "out" / "model-F32.gguf"), gguf_tensors(tmp_path / "out" / "model-F16.gguf")
    q8 = gguf_tensors(tmp_path / "out" / "model-Q8_0.gguf")
    finer_than_bf16 = 0
    for layer in range(2):
        for proj, gguf_name in GGUF_NAMES.items():
            name = f"blk.{layer}.{gguf_name}.weight"
            expected = expected_llama_cpp_tensor(peft, layer, proj)
            assert np.array_equal(f32[name], expected), name  # bit for bit
            assert f16[name].tobytes() == np.ascontiguousarray(reference.quantize(expected, QT.F16)).tobytes(), name
            assert q8[name].tobytes() == np.ascontiguousarray(reference.quantize(expected, QT.Q8_0)).tobytes(), name
            finer_than_bf16 += int((expected != torch.from_numpy(expected).bfloat16().float().numpy()).sum())
    assert finer_than_bf16 > 1000  # the merge really has fp32 precision: a bf16 round trip would have lost it
    # Untouched tensors are the base's bf16 values, widened exactly.
    from conftest import load_output

    embed = load_output(base)["model.embed_tokens.weight"]
    assert np.array_equal(f32["token_embd.weight"], embed.float().numpy())


def _count_base_reads(monkeypatch) -> Counter:
    from converters.safetensors_in import SafetensorsFile

    reads: Counter = Counter()
    real = SafetensorsFile.tensor

    def counting(self, name):
        if self.path.name.startswith("model"):
            reads[name] += 1
        return real(self, name)

    monkeypatch.setattr(SafetensorsFile, "tensor", counting)
    return reads


def test_many_formats_in_one_pass_equal_single_runs_and_read_the_base_once(bf16_case, tmp_path, monkeypatch):
    base, adapter, _ = bf16_case
    formats = ("safetensors", "gguf:f16", "gguf:q8_0", "gguf-lora")
    reads = _count_base_reads(monkeypatch)
    run_export(base, adapter, tmp_path / "all", formats=formats, parity=False)
    base_tensors = set(json.loads((base / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (base / "model.safetensors").read_bytes()[:8], "little")])) - {"__metadata__"}
    assert set(reads) <= base_tensors and max(reads.values()) == 1, reads  # each tensor read at most once
    for fmt in formats:
        run_export(base, adapter, tmp_path / fmt.replace(":", "-"), formats=(fmt,), parity=False)
    singles = {p.name: p for fmt in formats for p in (tmp_path / fmt.replace(":", "-")).iterdir()}
    for name in ("model.safetensors", "model-F16.gguf", "model-Q8_0.gguf", "adapter.gguf", "config.json",
                 "tokenizer.json"):
        assert (tmp_path / "all" / name).read_bytes() == singles[name].read_bytes(), name


def _cli(*args: str):
    return CliRunner().invoke(main, ["-q", *args])


def test_to_is_repeatable_and_takes_comma_lists(bf16_case, tmp_path):
    base, adapter, _ = bf16_case
    common = ["run", "--base", str(base), "--adapter", str(adapter), "--parity", "off", "--no-progress"]
    repeated = _cli(*common, "--out", str(tmp_path / "a"), "--to", "gguf:f16", "--to", "safetensors,gguf:q8_0",
                    "--to", "gguf")  # "gguf" is gguf:f16: collapses
    listed = _cli(*common, "--out", str(tmp_path / "b"), "--to", "gguf:f16,safetensors,gguf:q8_0")
    assert repeated.exit_code == listed.exit_code == 0, repeated.output + listed.output
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name not in ("report.json", "README.md"))
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir() if p.name not in ("report.json", "README.md"))
    assert {"model-F16.gguf", "model-Q8_0.gguf", "model.safetensors", "Modelfile.f16", "Modelfile.q8_0"} <= set(names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    formats = [a["format"] for a in json.loads((tmp_path / "a" / "report.json").read_text())["artifacts"]]
    assert formats == ["gguf", "safetensors", "gguf"]


def test_an_option_given_twice_is_an_error(bf16_case, tmp_path):
    """Every single-valued option of every command: given twice, one error line and exit 2, never the last value."""
    import click

    from exporter.cli import OnceOption

    base, adapter, _ = bf16_case
    values = {"--base": str(base), "--adapter": str(adapter), "--out": str(tmp_path / "out"), "--dtype": "float32",
              "--device": "cpu", "--parity": "off", "--max-shard-size": "1GB", "--max-abs": "1", "--max-kl": "1",
              "--min-top1": "0.5", "--gguf-pre": "llama-bpe", "--parity-memory": "whole",
              "--original-base": str(base), "--merge-into": "dequantized", "--min-effect-kept": "0.5",
              "--push-to": "me/model", "--revision": "dev", "--combine": "sum", "--combine-space": "adapter",
              "--weights": "1,1", "--density": "0.5", "--majority-sign-method": "total", "--svd-rank": "4",
              "--svd-clamp": "0.9", "--seed": "1"}
    checked = 0
    for command in main.commands.values():
        once = [p for p in command.params if isinstance(p, OnceOption)]
        positional = [str(adapter)] if any(isinstance(p, click.Argument) for p in command.params) else []
        for option in once:
            required = [arg for p in once if p.required and p is not option for arg in (p.opts[0], values[p.opts[0]])]
            args = [command.name, *positional, *required, option.opts[0], values[option.opts[0]], option.opts[0],
                    values[option.opts[0]]]
            result = _cli(*args)
            assert result.exit_code == 2 and "given 2 times" in result.output, (args, result.output)
            checked += 1
    assert checked >= 14
    assert not (tmp_path / "out").exists()


# --- pre-flight: everything a format needs is checked before the merge starts ---------------------------------------

def _no_merge_allowed(monkeypatch):
    import exporter.stages.merge as merge_stage

    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the merge started before a pre-flight refusal")

    monkeypatch.setattr(merge_stage, "LoraMerge", Refuse)


def _without_tokenizer(base: Path, adapter: Path, tmp: Path) -> tuple[Path, Path]:
    bare = Path(shutil.copytree(base, tmp / "bare"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    return bare, adapter


def _gpt2(base: Path, adapter: Path, tmp: Path) -> tuple[Path, Path]:
    from conftest import build_peft_adapter, build_tiny_base

    gpt2 = build_tiny_base(tmp / "gpt2", "gpt2")
    return gpt2, build_peft_adapter(tmp / "gpt2-adapter", gpt2, r=4, lora_alpha=8, fan_in_fan_out=True,
                                    target_modules=["c_attn"])


def _k_quant_without_llama_cpp(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)


PREFLIGHT = {
    "GGUF without a tokenizer": (_without_tokenizer, None, ["gguf:f16"], ["holds no tokenizer", "GGUF"]),
    "GGUF of an unsupported architecture": (_gpt2, None, ["gguf:f16"], ["GPT2LMHeadModel", "not supported"]),
    "K-quant without llama.cpp": (None, _k_quant_without_llama_cpp, ["gguf:q4_k_m"],
                                  ["q4_k_m", "lora-export[llama]"]),
    "unknown GGUF type": (None, None, ["gguf:q3_x"], ["'q3_x' is not a gguf variant", "q8_0"]),
    "unknown format": (None, None, ["ggml"], ["is not an export format", "gguf-lora"]),
    "GGUF LoRA of a DoRA adapter": (None, None, ["safetensors", "gguf-lora"], ["DoRA", "--to gguf"]),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT))
def test_preflight_refuses_before_the_merge(bf16_case, tmp_path, monkeypatch, case):
    from conftest import build_peft_adapter

    base, adapter, _ = bf16_case
    make_inputs, patch, formats, fragments = PREFLIGHT[case]
    if make_inputs is not None:
        base, adapter = make_inputs(base, adapter, tmp_path)
    if case == "GGUF LoRA of a DoRA adapter":
        adapter = build_peft_adapter(tmp_path / "dora", base, r=4, lora_alpha=8, use_dora=True,
                                     target_modules=["q_proj"])
    if patch is not None:
        patch(monkeypatch)
    _no_merge_allowed(monkeypatch)
    out = tmp_path / "out"
    result = _cli("run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--no-progress",
                  *[arg for f in formats for arg in ("--to", f)])
    assert result.exit_code == 2, result.output
    line = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and all(f in line[0] for f in fragments), result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_gguf_from_a_config_without_architectures(bf16_case, tmp_path):
    """transformers loads a config that only has model_type; so does the GGUF export."""
    base, adapter, _ = bf16_case
    plain = Path(shutil.copytree(base, tmp_path / "base"))
    config = json.loads((plain / "config.json").read_text())
    del config["architectures"]
    (plain / "config.json").write_text(json.dumps(config))
    ctx = run_export(plain, adapter, tmp_path / "out", formats=("gguf:f16",))
    assert ctx.artifacts[0].parity.passed
