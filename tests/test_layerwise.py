"""Parity that scales: models run module by module (exporter/parity/layerwise.py) give what the whole model gives, the
reference still equals PEFT's unmerged model, and memory stays flat as the model grows.

Oracles: PEFT's unmerged model, transformers' own from_pretrained forward, and peak RSS measured in child processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_peft_adapter, build_tiny_base, peft_unmerged_logits, train_adapter

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"]),
    "qwen2": dict(r=4, lora_alpha=8, use_rslora=True, lora_bias=True, use_dora=False, target_modules=["k_proj"]),
    "gemma3": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "o_proj"]),
    "phi3": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["qkv_proj", "down_proj"]),
    "gpt2": dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True, target_modules=["c_attn", "c_fc"]),
    "llama-resized": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"],
                          resize_vocab_to=136),
}


def tiny_phi3(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Phi3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0,
        tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def probes(vocab: int = 128) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in (5, 12, 9)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_reference_equals_peft_unmerged(tmp_path, case):
    from exporter.parity.layerwise import probe_logits
    from exporter.parity.reference import load_reference

    arch = case.split("-")[0]
    base = tiny_phi3(tmp_path / "base") if arch == "phi3" else build_tiny_base(tmp_path / "base", arch,
                                                                                 random_biases=True)
    kwargs = dict(CASES[case])
    resize = kwargs.pop("resize_vocab_to", None)
    adapter = build_peft_adapter(tmp_path / "adapter", base, resize_vocab_to=resize, **kwargs)
    inputs = probes(resize or 128)
    streamed = probe_logits(load_reference(base, adapter, torch.device("cpu"), mode="streamed"), inputs,
                            torch.device("cpu"))
    whole = probe_logits(load_reference(base, adapter, torch.device("cpu"), mode="whole"), inputs, torch.device("cpu"))
    peft = torch.cat([peft_unmerged_logits(base, adapter, p.unsqueeze(0), resize_vocab_to=resize)[0] for p in inputs])
    assert (streamed - peft).abs().max() <= 1e-5
    assert torch.equal(streamed, whole)  # the same arithmetic, only the loading differs


def test_streamed_artifact_equals_transformers_whole_model(tmp_path):
    """Our module-by-module forward of a merged bf16 folder against transformers' own loading and forward of it."""
    from transformers import AutoModelForCausalLM

    from conftest import run_export
    from exporter.parity.layerwise import CheckpointTensors, LoadedWeights, checkpoint_sources, probe_logits, skeleton

    base = build_tiny_base(tmp_path / "base", "gemma3", dtype=torch.bfloat16)
    adapter = train_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    run_export(base, adapter, tmp_path / "out", parity=False)  # untied lm_head: two tensors in the folder
    model = skeleton(tmp_path / "out")
    LoadedWeights(model, checkpoint_sources(model, CheckpointTensors(tmp_path / "out")), "streamed",
                  torch.device("cpu"))
    inputs = probes()
    ours = probe_logits(model, inputs, torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.cat([hf(input_ids=p.unsqueeze(0)).logits[0] for p in inputs])
    assert (ours - expected).abs().max() <= 1e-5


# The CLI in a child process with the parity stage wrapped: the kernel's high-water mark of resident memory (VmHWM)
# is reset as parity starts (writing 5 to /proc/self/clear_refs) and read when it ends, an independent measurement of
# the peak the report states. While parity computes its reference the child also holds BALLAST_MB of touched memory,
# freed before the artifact runs: a figure that is not the peak (the last sample, a constant) misses it.
BALLAST_MB = 256
CLI_WITH_KERNEL_PEAK = f"""
import re, sys, time
from pathlib import Path
from exporter.stages.parity import ParityStage
run_parity, model_logits, ballast_held = ParityStage.run, ParityStage._model_logits, []
def run(self, ctx):
    Path("/proc/self/clear_refs").write_text("5")
    run_parity(self, ctx)
    status = Path("/proc/self/status").read_text()
    Path(sys.argv[1]).write_text(re.search(r"VmHWM:\\s+(\\d+) kB", status)[1])
def with_ballast(*args, **kwargs):
    if ballast_held:
        return model_logits(*args, **kwargs)
    ballast = bytearray({BALLAST_MB} * 2**20)
    ballast[::4096] = bytes(len(ballast) // 4096)  # every page written, so resident
    ballast_held.append(True)
    time.sleep(0.2)  # ten of the report's polls at least
    try:
        return model_logits(*args, **kwargs)
    finally:
        del ballast
ParityStage.run, ParityStage._model_logits = run, staticmethod(with_ballast)
from exporter.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("mode", ["streamed", "whole"])
def test_parity_memory_modes_give_the_same_figures(tmp_path, mode):
    from click.testing import CliRunner

    from exporter.cli import main
    from exporter.demo import build_base

    base = build_base(tmp_path / "base")
    adapter = train_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, tokenizer=True,
                            target_modules=["q_proj", "v_proj", "down_proj"])
    results = {}
    for chosen in ("auto", mode):
        out = tmp_path / chosen
        args = ["-q", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--no-progress",
                "--parity-memory", chosen]
        if chosen == "auto":
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
        else:
            child = subprocess.run([sys.executable, "-c", CLI_WITH_KERNEL_PEAK, str(tmp_path / "hwm"), *args],
                                   capture_output=True, text=True, cwd=ROOT)
            assert child.returncode == 0, child.stderr
        results[chosen] = json.loads((out / "report.json").read_text())
    run = results[mode]["parity_run"]
    assert run["mode"] == mode and run["why"].startswith(f"--parity-memory {mode}")
    # The report's peak is polled every 20 ms, so it may miss a short spike, never exceed the kernel's figure (+1 for
    # its rounding to whole MB). Measured: 618 and 624 MB reported against the kernel's 624 MB.
    kernel_peak_mb = int((tmp_path / "hwm").read_text()) / 1024
    assert kernel_peak_mb > BALLAST_MB + 100  # the ballast was resident, on top of torch and the models
    assert 0.9 * kernel_peak_mb <= run["peak_rss_mb"] <= kernel_peak_mb + 1, (run, kernel_peak_mb)
    assert 0 < run["peak_anon_mb"] <= run["peak_rss_mb"]
    assert results["auto"]["parity_run"]["mode"] == "whole"  # a tiny model fits
    strip = ("path",)
    figures = [{k: v for k, v in r["artifacts"][0]["parity"].items() if k not in strip} for r in results.values()]
    assert figures[0] == figures[1]


def _parity_peak_rss(tmp: Path, layers: int, mode: str, run: int = 0) -> tuple[float, float]:
    """(peak RSS of the parity stage in MB, model bytes) of a run in a child process."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from pathlib import Path
from transformers import AutoModelForCausalLM, LlamaConfig
from exporter.demo import build_adapter
root = Path({str(tmp)!r})
base = root / "base-{layers}"
if not base.exists():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers={layers},
                         num_attention_heads=8, num_key_value_heads=4, initializer_range=0.02,
                         tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base)
    build_adapter(root / "adapter-{layers}", base, r=8)
from exporter.context import ExportPlan
from exporter.pipeline import run_pipeline
ctx = run_pipeline(ExportPlan(str(base), str(root / "adapter-{layers}"), root / "out-{layers}-{mode}-{run}",
                               parity_memory={mode!r}, progress=False))
assert ctx.artifacts[0].parity.passed
size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
print(json.dumps([ctx.report["parity_run"]["peak_rss_mb"], size]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_streamed_parity_memory_is_flat_as_the_model_doubles(tmp_path):
    """12 → 24 layers (≈ 60 → 120 MB of bf16, twice that in float32): streamed parity's peak stays within 1.2x, while
    whole-model parity grows with the model (which shows the measurement can see the difference)."""
    # One run's peak moves by up to ±70 MB around ≈450 MB (the allocator's timing across threads, measured over
    # repeated runs of one model): the lower of two runs per size is what the model's size decides.
    (small, small_bytes), (large, large_bytes) = (
        min(_parity_peak_rss(tmp_path, layers, "streamed", run) for run in (0, 1)) for layers in (12, 24))
    whole_small, _ = _parity_peak_rss(tmp_path, 12, "whole")
    whole_large, _ = _parity_peak_rss(tmp_path, 24, "whole")
    assert 1.8 < large_bytes / small_bytes < 2.2
    assert large / small <= 1.2, (small, large)
    growth_mb = (large_bytes - small_bytes) * 2 / 2**20  # the added layers in float32 (measured: whole +84 MB of 144)
    assert whole_large - whole_small >= 0.5 * growth_mb, (whole_small, whole_large, growth_mb)
