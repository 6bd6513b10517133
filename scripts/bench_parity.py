"""Benchmark parity's memory and time as the model grows: module by module ("streamed") against whole-model runs.

Builds (or reuses) in --workdir two seeded llama-shaped bf16 bases, ≈ --sizes GB (default 2 and 4: more layers, same
width; bench_merge's builder) with a rank-16 LoRA on every linear layer, then runs, each in its own process with the
page cache warm:
  streamed-2, streamed-4   `lora-export run --parity-memory streamed` (safetensors, parity on)
  whole-2                  `lora-export run --parity-memory whole` on the smaller model (parity as it ran before:
                           every model held whole, in float32)
  gguf-2                   `--to gguf:f16 --parity-memory streamed` on the smaller model: llama.cpp's share of memory
From each run's report.json: parity's own time and its peak resident memory (anonymous and file-backed pages apart:
llama.cpp maps the GGUF, and mapped file pages are page cache the kernel can evict, not memory the run holds).
Targets, reported, never asserted: streamed peak RSS larger/smaller ≤ 1.2 and ≤ 0.5 × the larger model's bytes;
streamed parity time ≤ 1.5 × whole on the smaller model. Then, from the measured per-layer figures, what a 70B run
would need. Results also go to <workdir>/bench_parity.json.
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
from bench_merge import HIDDEN, INTER, KV_HEADS, HEADS, VOCAB, build_once, measure, run_script, warm  # noqa: E402

# Llama 3 70B's shape, for the estimate.
L70 = {"layers": 80, "hidden": 8192, "inter": 28672, "heads": 64, "kv_heads": 8, "vocab": 128256}


def layer_params(hidden: int, inter: int, heads: int, kv_heads: int) -> int:
    kv = hidden // heads * kv_heads
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter


def child_build(folder: str, size_gb: str) -> None:
    from bench_gguf import child_build_llama

    child_build_llama(folder, size_gb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,4", help="two model sizes in GB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_parity"))
    args = parser.parse_args()
    started, workdir = time.perf_counter(), args.workdir.resolve()
    small_gb, large_gb = (float(s) for s in args.sizes.split(","))
    lora_export = str(Path(sys.executable).parent / "lora-export")
    models = {}
    for size in (small_gb, large_gb):
        folder = workdir / f"llama-{size:g}"
        build_once(SELF, folder, size, folder / "base" / "bench_meta.json")
        models[size] = folder

    def case(name: str, size: float, *extra: str) -> dict:
        folder = models[size]
        out = folder / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        warm(folder / "base", folder / "adapter")
        cmd = [lora_export, "run", "--base", str(folder / "base"), "--adapter", str(folder / "adapter"), "--out",
               str(out), "--no-progress", *extra]
        row = measure(name, cmd, workdir / f"log-{name}.txt")
        report = json.loads((out / "report.json").read_text())
        row.update(parity_s=report["timings_s"]["parity"], parity_run=report["parity_run"],
                   model_gb=sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors")) / 1e9,
                   layers=json.loads((folder / "base" / "bench_meta.json").read_text())["layers"],
                   figures={a["format"] + ":" + a["parity"]["dtype"]: {k: a["parity"][k] for k in ("kl", "max_abs")}
                            for a in report["artifacts"]})
        shutil.rmtree(out)
        print(f"{name:<12} {row['model_gb']:5.2f} GB  wall {row['wall_s']:7.1f} s  parity {row['parity_s']:6.1f} s  "
              f"parity peak RSS {row['parity_run']['peak_rss_mb']:6.0f} MB (anon {row['parity_run']['peak_anon_mb']:6.0f})"
              f"  process peak {row['peak_rss_mb']:6.0f} MB  {row['parity_run']['mode']}", flush=True)
        return row

    rows = {
        "streamed-2": case("streamed-2", small_gb, "--parity-memory", "streamed"),
        "streamed-4": case("streamed-4", large_gb, "--parity-memory", "streamed"),
        "whole-2": case("whole-2", small_gb, "--parity-memory", "whole"),
        "gguf-2": case("gguf-2", small_gb, "--parity-memory", "streamed", "--to", "gguf:f16"),
    }
    s2, s4, w2 = rows["streamed-2"], rows["streamed-4"], rows["whole-2"]
    peak = {k: r["parity_run"]["peak_rss_mb"] for k, r in rows.items()}
    ratios = {
        "streamed peak RSS larger/smaller": (peak["streamed-4"] / peak["streamed-2"], "<= 1.2",
                                             peak["streamed-4"] / peak["streamed-2"] <= 1.2),
        "streamed peak RSS / larger model bytes": (peak["streamed-4"] * 2**20 / (s4["model_gb"] * 1e9), "<= 0.5",
                                                   peak["streamed-4"] * 2**20 / (s4["model_gb"] * 1e9) <= 0.5),
        "streamed/whole parity time (smaller)": (s2["parity_s"] / w2["parity_s"], "<= 1.5",
                                                 s2["parity_s"] / w2["parity_s"] <= 1.5),
        "whole peak RSS / streamed (smaller)": (peak["whole-2"] / peak["streamed-2"], "reported", True),
    }
    print()
    for key, (value, target, ok) in ratios.items():
        print(f"{key:<42}{value:7.3f}   target {target:<9}{'' if target == 'reported' else ('PASS' if ok else 'MISS')}")

    # 70B on paper, from the larger model's per-layer parity time and the measured memory above the block.
    per_layer = layer_params(HIDDEN, INTER, HEADS, KV_HEADS)
    extra_layers = s4["layers"] - s2["layers"]
    seconds_per_param = (s4["parity_s"] - s2["parity_s"]) / (extra_layers * per_layer)  # parity time per parameter
    params_70b = L70["layers"] * layer_params(L70["hidden"], L70["inter"], L70["heads"], L70["kv_heads"]) \
        + 2 * L70["vocab"] * L70["hidden"]
    largest_block_gb = max(L70["vocab"] * L70["hidden"], L70["inter"] * L70["hidden"]) * 4 / 1e9
    constant_gb = peak["streamed-4"] * 2**20 / 1e9 - max(VOCAB * HIDDEN, INTER * HIDDEN) * 4 / 1e9
    estimate = {
        "parameters": params_70b,
        "disk_bf16_base_gb": params_70b * 2 / 1e9,
        "disk_bf16_output_gb": params_70b * 2 / 1e9,
        "parity_ram_gb": largest_block_gb + constant_gb,
        "parity_ram_note": "largest block (the 128k x 8192 embedding) in float32 + the constant measured above it",
        "parity_time_min": params_70b * seconds_per_param * 2 / 60,  # reference + one safetensors artifact
        "seconds_per_billion_parameters": seconds_per_param * 1e9,
    }
    print(f"\n70B on paper: {params_70b / 1e9:.0f}B parameters; bf16 base and output {estimate['disk_bf16_base_gb']:.0f} "
          f"GB each on disk; parity RAM ≈ {estimate['parity_ram_gb']:.1f} GB (largest block {largest_block_gb:.1f} GB "
          f"in float32 + {constant_gb:.1f} GB measured); parity time ≈ {estimate['parity_time_min']:.0f} min on this "
          f"machine ({estimate['seconds_per_billion_parameters']:.1f} s per billion parameters per model, two models)")
    total = time.perf_counter() - started
    (workdir / "bench_parity.json").write_text(json.dumps(
        {"cases": rows, "ratios": {k: {"value": v, "target": t, "pass": ok} for k, (v, t, ok) in ratios.items()},
         "estimate_70b": estimate, "script_s": total}, indent=2, default=str) + "\n")
    print(f"\nwhole script: {total:.1f} s; wrote {workdir / 'bench_parity.json'}")


if __name__ == "__main__":
    run_script({"_build": child_build}, main)
