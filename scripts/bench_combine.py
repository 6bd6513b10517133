"""Benchmark several adapters into one model: three rank-16 adapters combined and merged, against one adapter merged,
and against PEFT doing the same.

Builds (or reuses) in --workdir bench_merge.py's seeded llama-shaped bf16 base of --size-gb (default 2) and three
r=16, alpha=32 LoRAs on q/k/v/o/gate/up/down (seeds 1-3); then runs, each in its own subprocess with a warm page
cache and `--parity off`:
  (a) one adapter:        lora-export run --adapter A1
  (b) three, sum:         lora-export run --adapter A1,A2,A3 --combine sum --weights 1,0.5,0.25
  (c) PEFT:               from_pretrained(bf16) + three load_adapter + add_weighted_adapter(cat, same weights)
                          + merge_and_unload + save_pretrained
  (d) three, delta ties:  lora-export run ... --combine ties --combine-space delta --density 0.5 (no target: where
                          the full-delta methods' time goes)

Targets, reported as PASS/MISS and never asserted:
  (b)/(a) wall time <= 1.3     (b)/(a) peak RSS <= 1.1 (the same, within polling noise)
  (c)/(b) wall time >= 3       (b)/(c) peak RSS <= 0.25
A few merged tensors of (b) and (c) are compared at the end with the exact answer (float64, rounded once to bf16). Everything also goes to <workdir>/bench_combine.json.
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
from bench_merge import build_once, child, child_extract, measure, run_script, warm  # noqa: E402

WEIGHTS = (1.0, 0.5, 0.25)
TARGETS = {"three/one time": ("<=", 1.3), "three/one peak RSS": ("<=", 1.1), "peft/three time": (">=", 3.0),
           "three/peft peak RSS": ("<=", 0.25)}


def child_build(folder: str, size_gb: str) -> None:
    """bench_merge's base and first adapter, then two more adapters of the same shape (other seeds)."""
    from bench_merge import child_build as build

    from exporter.demo import build_adapter

    build(folder, size_gb)
    for seed in (2, 3):
        build_adapter(Path(folder) / f"adapter{seed}", Path(folder) / "base", seed=seed + 1, r=16, alpha=32.0)


def child_peft(base: str, adapters: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders = adapters.split(",")
    names = [f"a{i}" for i in range(len(folders))]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), folders[0],
                                      adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(folder, adapter_name=name)
    model.add_weighted_adapter(names, list(WEIGHTS), "combined", combination_type="cat")
    model.merge_and_unload(adapter_names=["combined"]).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_combine"))
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (interleaved): fastest time, max RSS")
    args = parser.parse_args()
    t_start, workdir = time.perf_counter(), args.workdir.resolve()
    base = workdir / "base"
    adapters = [workdir / "adapter", workdir / "adapter2", workdir / "adapter3"]
    build_once(SELF, workdir, args.size_gb, base / "bench_meta.json")
    if not all(a.is_dir() for a in adapters):
        shutil.rmtree(workdir)
        build_once(SELF, workdir, args.size_gb, base / "bench_meta.json")
    layers = json.loads((base / "bench_meta.json").read_text())["layers"]
    shards = sorted(base.glob("*.safetensors"))
    print(f"base: {sum(f.stat().st_size for f in shards) / 1e9:.2f} GB bf16 in {len(shards)} shards, {layers} layers; "
          "3 adapters: r=16, alpha=32 on q,k,v,o,gate,up,down")
    py, cli = sys.executable, str(Path(sys.executable).parent / "lora-export")
    listed = ",".join(map(str, adapters))
    weights = ",".join(f"{w:g}" for w in WEIGHTS)
    common = [cli, "run", "--base", str(base), "--parity", "off", "--no-progress"]
    cases = {"a one adapter": [*common, "--adapter", str(adapters[0]), "--out"],
             "b three, sum": [*common, "--adapter", listed, "--combine", "sum", "--weights", weights, "--out"],
             "c peft": [py, SELF, "_peft", str(base), listed],
             "d three, ties": [*common, "--adapter", listed, "--combine", "ties", "--combine-space", "delta",
                               "--density", "0.5", "--weights", weights, "--out"]}
    check = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{layers // 2}.mlp.down_proj.weight",
             f"model.layers.{layers - 1}.self_attn.v_proj.weight"]
    print("each case: own subprocess, base read once first (warm page cache), fresh output folder, no fsync")
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for i, (name, cmd) in ((i, case) for i in range(args.repeat) for case in cases.items()):
        tag = name.split()[0]
        out = workdir / f"out_{tag}"
        shutil.rmtree(out, ignore_errors=True)
        warm(base, *adapters)
        r = measure(name, cmd + [str(out)], workdir / f"log_{tag}.txt")
        runs[name].append(r)
        print(f"  {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, other load "
              f"{r['other_load_cores']:.2f} cores", flush=True)
        if tag in ("b", "c") and i == 0:
            child("_extract", str(out), str(workdir / f"check_{tag}.safetensors"), *check, script=SELF)
        shutil.rmtree(out)
    rows = {name.split()[0]: {**min(rs, key=lambda r: r["wall_s"]), "runs": len(rs),
                              **{k: max(r[k] for r in rs) for k in ("peak_rss_mb", "peak_anon_mb", "kernel_maxrss_mb")}}
            for name, rs in runs.items()}
    if any(r["other_load_cores"] > 0.2 for r in rows.values()):
        print("\nWARNING: other processes used > 0.2 cores during a case: its time is unreliable (see other load)")
    print(f"\n{'case':<16}{'wall s':>8}{'peak RSS MB':>13}{'peak anon MB':>14}{'kernel maxrss MB':>18}{'CPU s':>8}")
    for r in rows.values():
        print(f"{r['case']:<16}{r['wall_s']:>8.2f}{r['peak_rss_mb']:>13.0f}{r['peak_anon_mb']:>14.0f}"
              f"{r['kernel_maxrss_mb']:>18.0f}{r['cpu_s']:>8.1f}")
    a, b, c, d = rows["a"], rows["b"], rows["c"], rows["d"]
    values = {"three/one time": b["wall_s"] / a["wall_s"], "three/one peak RSS": b["peak_rss_mb"] / a["peak_rss_mb"],
              "peft/three time": c["wall_s"] / b["wall_s"], "three/peft peak RSS": b["peak_rss_mb"] / c["peak_rss_mb"]}
    ratios = {key: {"value": v, "target": f"{TARGETS[key][0]} {TARGETS[key][1]}",
                    "result": "PASS" if (v >= TARGETS[key][1]) == (TARGETS[key][0] == ">=") else "MISS"}
              for key, v in values.items()}
    print("\n" + "\n".join(f"{k:<22}{r['value']:>7.3f}   target {r['target']:<7} {r['result']}"
                           for k, r in ratios.items()))
    print(f"{'ties (delta)/one time':<22}{d['wall_s'] / a['wall_s']:>7.3f}   (no target)")

    import torch
    from safetensors.torch import load_file

    from safetensors import safe_open

    # The exact answer, computed here in float64 from the inputs and rounded once to bf16: W + Σ wᵢ·sᵢ·BᵢAᵢ.
    child("_extract", str(base), str(workdir / "check_base.safetensors"), *check, script=SELF)
    base_w = load_file(workdir / "check_base.safetensors")
    print("\nmerged tensors against W + Σ wᵢ·sᵢ·BᵢAᵢ computed in float64 and rounded once to bf16:")
    got = {tag: load_file(workdir / f"check_{tag}.safetensors") for tag in ("b", "c")}
    agreement = {}
    for name in check:
        exact = base_w[name].double()
        module = name.removesuffix(".weight")
        for folder, w in zip(adapters, WEIGHTS):
            config = json.loads((folder / "adapter_config.json").read_text())
            with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
                a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").double()
                b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").double()
            exact += w * config["lora_alpha"] / config["r"] * (b @ a)
        rounded = exact.to(torch.bfloat16).float()
        ulp = torch.ldexp(torch.ones_like(rounded), torch.frexp(rounded.abs())[1] - 8)  # bf16 spacing there
        agreement[name] = {}
        for tag, who in (("b", "lora-export"), ("c", "peft")):
            diff = (got[tag][name].float() - rounded).abs()
            agreement[name][who] = {"max_bf16_ulps": float((diff / ulp).max()),
                                    "frac_differing": float((diff > 0).float().mean())}
        print(f"  {name:<42} " + "; ".join(f"{who}: max {r['max_bf16_ulps']:.2f} ulp, {r['frac_differing']:.3%} "
                                           "differ" for who, r in agreement[name].items()))
    total = time.perf_counter() - t_start
    print(f"\nwhole script: {total:.1f} s")
    result = {"size_gb": args.size_gb, "layers": layers, "cases": list(rows.values()), "ratios": ratios,
              "agreement": agreement, "all_runs": runs, "script_s": total}
    (workdir / "bench_combine.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {workdir / 'bench_combine.json'}")


if __name__ == "__main__":
    run_script({"_build": child_build, "_peft": child_peft, "_extract": child_extract}, main)
