"""Benchmark a QLoRA export: a bitsandbytes NF4 base (as users download *-bnb-4bit models) plus a rank-16 adapter on
every linear layer, merged and written as bf16 safetensors.

Builds (or reuses) in --workdir llama-shaped bf16 bases of --sizes GB (default 2 and 4; bench_merge's builder),
quantizes each to NF4 (double quant) with transformers itself and saves it, then runs, each in its own process with
the page cache warm:
  lora-export   `lora-export run --base <nf4> --adapter <lora> --parity off` (bf16 out)
  usual route   transformers loads the 4-bit base, model.dequantize(), PEFT merge_and_unload, save_pretrained
Targets, reported and never asserted: usual/lora-export time ≥ 3 and lora-export/usual peak RSS ≤ 0.25 on the
smaller model; lora-export's peak RSS larger/smaller ≤ 1.2. Results also go to <workdir>/bench_qlora.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

SELF = str(Path(__file__).resolve())
sys.path.insert(0, str(Path(SELF).parent))
from bench_merge import build_once, measure, run_script, warm  # noqa: E402

TARGETS = {"usual/lora-export time": (">=", 3.0), "lora-export/usual peak RSS": ("<=", 0.25),
           "lora-export peak RSS larger/smaller": ("<=", 1.2)}


def child_build(folder: str, size_gb: str) -> None:
    """bench_merge's bf16 llama and adapter; the base quantized to NF4 by transformers and saved."""
    import torch
    from bench_merge import child_build as build
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build(folder, size_gb)
    model = AutoModelForCausalLM.from_pretrained(
        Path(folder) / "base", device_map="cpu", dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model.save_pretrained(Path(folder) / "nf4", max_shard_size="500MB")
    meta = json.loads((Path(folder) / "base" / "bench_meta.json").read_text())
    (Path(folder) / "nf4" / "bench_meta.json").write_text(json.dumps(meta))
    shutil.rmtree(Path(folder) / "base")  # the float model is only the quantizer's input


def child_usual(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu", dtype=torch.bfloat16)
    model.dequantize()  # before any forward: on AVX512-bf16 CPUs the first forward repacks the 4-bit weights
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,4")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_qlora"))
    args = parser.parse_args()
    started, workdir = time.perf_counter(), args.workdir.resolve()
    lora_export = str(Path(sys.executable).parent / "lora-export")
    results = {}
    for size in (float(s) for s in args.sizes.split(",")):
        folder = workdir / f"llama-{size:g}"
        build_once(SELF, folder, size, folder / "nf4" / "bench_meta.json")
        base, adapter = folder / "nf4", folder / "adapter"
        rows = {}
        for name, cmd in (
                ("lora-export", [lora_export, "run", "--base", str(base), "--adapter", str(adapter), "--parity", "off",
                                 "--no-progress", "--out", str(folder / "out-lora-export")]),
                ("usual", [sys.executable, SELF, "_usual", str(base), str(adapter), str(folder / "out-usual")])):
            shutil.rmtree(folder / f"out-{name}", ignore_errors=True)
            warm(base, adapter)
            rows[name] = measure(name, cmd, workdir / f"log-{size:g}-{name}.txt")
            shutil.rmtree(folder / f"out-{name}", ignore_errors=True)
            print(f"{size:g} GB  {name:<12} {rows[name]['wall_s']:7.1f} s  peak RSS {rows[name]['peak_rss_mb']:6.0f} MB"
                  f"  other load {rows[name]['other_load_cores']:.2f}", flush=True)
        results[size] = rows
    sizes = sorted(results)
    small, large = results[sizes[0]], results[sizes[-1]]
    values = {"usual/lora-export time": small["usual"]["wall_s"] / small["lora-export"]["wall_s"],
              "lora-export/usual peak RSS": small["lora-export"]["peak_rss_mb"] / small["usual"]["peak_rss_mb"],
              "lora-export peak RSS larger/smaller": large["lora-export"]["peak_rss_mb"] / small["lora-export"]["peak_rss_mb"]}
    print()
    summary = {}
    for key, value in values.items():
        op, bound = TARGETS[key]
        ok = value >= bound if op == ">=" else value <= bound
        summary[key] = {"value": value, "target": f"{op} {bound}", "pass": ok}
        print(f"{key:<40}{value:7.3f}   target {op} {bound:<6}{'PASS' if ok else 'MISS'}")
    total = time.perf_counter() - started
    (workdir / "bench_qlora.json").write_text(json.dumps({"sizes": {str(k): v for k, v in results.items()},
                                                          "summary": summary, "script_s": total}, indent=2) + "\n")
    print(f"\nwhole script: {total:.1f} s; wrote {workdir / 'bench_qlora.json'}")


if __name__ == "__main__":
    run_script({"_build": child_build, "_usual": child_usual}, main)
