"""Benchmark the ONNX export and what it buys at inference.

Builds (or reuses) in --workdir llama-shaped bf16 bases of --sizes GB (default 1 and 2; bench_merge's builder) with a
rank-16 LoRA on every linear layer, then runs, each in its own process with the page cache warm:
  safetensors   `lora-export run --parity off --to safetensors`
  onnx:fp16     `lora-export run --parity off --to onnx:fp16`
and reports the ONNX export's time and peak RSS as ratios to the safetensors run, its peak RSS at both sizes (flat or
not), and on the smaller model decode speed: ONNX Runtime (CPU provider, KV cache) against transformers on the CPU
(the merged model, float32 compute and bf16 weights as saved, KV cache), tokens per second over --decode steps after a
16-token prompt. Reported, never asserted. Results also go to <workdir>/bench_onnx.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parent.parent
sys.path.insert(0, str(Path(SELF).parent))
from bench_merge import ENV, build_once, measure, run_script, warm  # noqa: E402


def child_build(folder: str, size_gb: str) -> None:
    from bench_merge import child_build as build

    build(folder, size_gb)


def child_decode(onnx_dir: str, hf_dir: str, steps: str) -> None:
    """Tokens per second of greedy decoding: ONNX Runtime with the graph's KV cache, transformers with its own."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.formats.onnx import _run, _session

    prompt, steps_n = list(range(3, 19)), int(steps)
    session = _session(Path(onnx_dir) / "model.onnx")
    logits, past = _run(session, prompt, None, len(prompt))
    start = time.perf_counter()
    token = int(logits[-1].argmax())
    for i in range(steps_n):
        logits, past = _run(session, [token], past, len(prompt) + i + 1)
        token = int(np.argmax(logits[-1]))
    ort_rate = steps_n / (time.perf_counter() - start)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        start = time.perf_counter()
        cache, token = out.past_key_values, out.logits[0, -1].argmax().reshape(1, 1)
        for _ in range(steps_n):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax().reshape(1, 1)
    hf_rate = steps_n / (time.perf_counter() - start)
    print(json.dumps({"ort_tokens_per_s": ort_rate, "transformers_tokens_per_s": hf_rate}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--decode", type=int, default=32, help="decode steps for the speed comparison")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_onnx"))
    args = parser.parse_args()
    started, workdir = time.perf_counter(), args.workdir.resolve()
    lora_export = str(Path(sys.executable).parent / "lora-export")
    results = {}
    sizes = [float(s) for s in args.sizes.split(",")]
    for size in sizes:
        folder = workdir / f"llama-{size:g}"
        build_once(SELF, folder, size, folder / "base" / "bench_meta.json")
        rows = {}
        for name, to in (("safetensors", "safetensors"), ("onnx:fp16", "onnx:fp16")):
            out = folder / f"out-{name.replace(':', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            warm(folder / "base", folder / "adapter")
            rows[name] = measure(name, [lora_export, "run", "--base", str(folder / "base"), "--adapter",
                                        str(folder / "adapter"), "--parity", "off", "--no-progress", "--to", to,
                                        "--out", str(out)], workdir / f"log-{size:g}-{name.replace(':', '-')}.txt")
            print(f"{size:g} GB  {name:<12} {rows[name]['wall_s']:7.1f} s  peak RSS {rows[name]['peak_rss_mb']:6.0f} MB",
                  flush=True)
        results[size] = rows
        if size == sizes[0]:
            decode = subprocess.run([sys.executable, SELF, "_decode", str(folder / "out-onnx-fp16" / "onnx"),
                                     str(folder / "out-safetensors"), str(args.decode)], env=ENV, cwd=ROOT,
                                    check=True, capture_output=True, text=True)
            results["decode"] = json.loads(decode.stdout.strip().splitlines()[-1])
        for name in rows:
            shutil.rmtree(folder / f"out-{name.replace(':', '-')}", ignore_errors=True)
    small, large = results[sizes[0]], results[sizes[-1]]
    ratios = {
        "onnx:fp16/safetensors time": small["onnx:fp16"]["wall_s"] / small["safetensors"]["wall_s"],
        "onnx:fp16/safetensors peak RSS": small["onnx:fp16"]["peak_rss_mb"] / small["safetensors"]["peak_rss_mb"],
        "onnx:fp16 peak RSS larger/smaller": large["onnx:fp16"]["peak_rss_mb"] / small["onnx:fp16"]["peak_rss_mb"],
        "ORT/transformers decode tokens/s": results["decode"]["ort_tokens_per_s"]
        / results["decode"]["transformers_tokens_per_s"],
    }
    print()
    for key, value in ratios.items():
        print(f"{key:<40}{value:7.3f}")
    print(f"decode: ONNX Runtime {results['decode']['ort_tokens_per_s']:.1f} tokens/s, transformers "
          f"{results['decode']['transformers_tokens_per_s']:.1f} tokens/s")
    total = time.perf_counter() - started
    (workdir / "bench_onnx.json").write_text(json.dumps(
        {"sizes": {str(k): v for k, v in results.items()}, "ratios": ratios, "script_s": total}, indent=2) + "\n")
    print(f"\nwhole script: {total:.1f} s; wrote {workdir / 'bench_onnx.json'}")


if __name__ == "__main__":
    run_script({"_build": child_build, "_decode": child_decode}, main)
