"""Benchmark lora-export's streaming merge against the I/O floor and PEFT's merge_and_unload.

Builds (or reuses) in --workdir a seeded llama-shaped bf16 base of --size-gb (hidden 2048, intermediate 5632, vocab
32000, untied, 500MB shards + index) and an r=16, alpha=32 LoRA on q/k/v/o/gate/up/down; then runs, each in its own
subprocess: (a) copy: shutil.copyfile of every base file (the I/O floor); (b) `lora-export run --parity off
--no-progress`; (c) PEFT: from_pretrained(bf16) + PeftModel.from_pretrained + merge_and_unload + save_pretrained.

Targets, reported as PASS/MISS and never asserted:
  (c)/(b) wall time >= 3      (b)/(c) peak RSS <= 0.25      (b)/(a) wall time <= 2

Peak RSS is psutil's, polled every 50 ms over the child's process tree (mapped file pages count, as in `ps`), shown
with its anonymous part and the kernel's high-water mark (wait4 ru_maxrss). "other load" is the CPU that processes
outside the case used meanwhile, in cores: above ~0.2 the time is unreliable. The base is read once before each case
(warm page cache); outputs are not fsynced; wall times include interpreter start-up and imports. A few merged tensors
of (b) and (c) are compared at the end. Everything also goes to <workdir>/bench_merge.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parent.parent
HIDDEN, INTER, VOCAB, KV_HEADS, HEADS = 2048, 5632, 32000, 4, 32
TARGETS = {"peft/lora time": (">=", 3.0), "lora/peft peak RSS": ("<=", 0.25), "lora/copy time": ("<=", 2.0)}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def child_build(folder: str, size_gb: str, seed: str = "0") -> None:
    """A bf16 llama built on the meta device, materialised uninitialised in bf16 and filled in place (no fp32 copy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporter.demo import build_adapter

    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // HEADS * KV_HEADS) + 3 * HIDDEN * INTER)
    layers = max(1, math.ceil((float(size_gb) * 1e9 - 2 * 2 * VOCAB * HIDDEN) / per_layer))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
                         tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in model.parameters():  # RMSNorm weights (1-D) are ones, matrices small random values
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02, generator=gen)
    base = Path(folder) / "base"
    model.save_pretrained(base, max_shard_size="500MB")
    build_adapter(Path(folder) / "adapter", base, seed=int(seed) + 1, r=16, alpha=32.0)
    (base / "bench_meta.json").write_text(json.dumps({"size_gb": float(size_gb), "seed": int(seed), "layers": layers}))


def child_copy(base: str, out: str) -> None:
    os.makedirs(out)
    for name in sorted(os.listdir(base)):
        shutil.copyfile(os.path.join(base, name), os.path.join(out, name))


def child_peft(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)


def child_extract(folder: str, dest: str, *names: str) -> None:
    """Keep a few tensors of an output (to compare after its folder is gone) in one small file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index, tensors = Path(folder) / "model.safetensors.index.json", {}
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    for name in names:
        with safe_open(Path(folder) / where.get(name, "model.safetensors"), "pt") as f:
            tensors[name] = f.get_tensor(name)
    save_file(tensors, dest)


def child(*args: str, script: str = SELF) -> None:
    subprocess.run([sys.executable, script, *args], env=ENV, cwd=ROOT, check=True)


def build_once(script: str, folder: Path, size_gb: float, meta: Path) -> None:
    """``script _build folder size_gb`` in its own process, unless ``meta`` (the bench_meta.json a build writes last)
    says ``folder`` already holds a model of that size."""
    if meta.is_file() and json.loads(meta.read_text())["size_gb"] == size_gb:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    child("_build", str(folder), str(size_gb), script=script)


def run_script(children: dict[str, Callable[..., None]], main: Callable[[], None]) -> None:
    """A benchmark script's entry: ``script _name args…`` runs one child step in this process, anything else main()."""
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) > 1 and sys.argv[1] in children:
        children[sys.argv[1]](*sys.argv[2:])
    else:
        main()


def warm(*folders: Path) -> None:
    buf = bytearray(4 * 2**20)  # small: a child's kernel maxrss starts at this process's high-water mark (vfork)
    for f in sorted(p for folder in folders for p in folder.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def busy_cpu_s() -> float:  # CPU seconds the whole machine has spent busy
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


def measure(name: str, cmd: list[str], log: Path) -> dict:
    """Wall time, polled peak RSS / anon of the process tree, kernel maxrss (wait4), CPU used by other processes."""
    me = psutil.Process()
    with open(log, "w") as out:
        busy0, mine0, start = busy_cpu_s(), sum(me.cpu_times()[:2]), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        root, peak, peak_anon = psutil.Process(proc.pid), 0, 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - start
                proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
                break
            try:
                infos = [p.memory_info() for p in [root, *root.children(recursive=True)]]
                peak = max(peak, sum(m.rss for m in infos))
                peak_anon = max(peak_anon, sum(m.rss - m.shared for m in infos))
            except psutil.Error:
                pass  # exited between wait4 and the poll
            time.sleep(0.05)
        other = busy_cpu_s() - busy0 - (sum(me.cpu_times()[:2]) - mine0) - usage.ru_utime - usage.ru_stime
    if proc.returncode:
        sys.exit(f"case {name} failed (exit {proc.returncode}):\n" + log.read_text()[-3000:])
    return {"case": name, "wall_s": wall, "peak_rss_mb": peak / 2**20, "peak_anon_mb": peak_anon / 2**20,
            "kernel_maxrss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
            "other_load_cores": max(0.0, other) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (interleaved): fastest time, max RSS")
    args = parser.parse_args()
    t_start, workdir = time.perf_counter(), args.workdir.resolve()
    base, adapter = workdir / "base", workdir / "adapter"
    meta = base / "bench_meta.json"
    if meta.is_file() and json.loads(meta.read_text())["size_gb"] == args.size_gb and adapter.is_dir():
        print(f"reusing {base} and {adapter}")
    else:
        for folder in (base, adapter):
            shutil.rmtree(folder, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        child("_build", str(workdir), str(args.size_gb))
        print(f"built base and adapter in {time.perf_counter() - t_start:.1f} s")
    layers = json.loads(meta.read_text())["layers"]
    shards = sorted(base.glob("*.safetensors"))
    print(f"base: {sum(f.stat().st_size for f in shards) / 1e9:.2f} GB bf16 in {len(shards)} shards, {layers} layers;"
          " adapter: r=16, alpha=32 on q,k,v,o,gate,up,down")
    check = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{layers // 2}.mlp.down_proj.weight",
             f"model.layers.{layers - 1}.self_attn.v_proj.weight"]
    py = sys.executable
    cases = {"a copy": [py, SELF, "_copy", str(base)],
             "b lora-export": [str(Path(py).parent / "lora-export"), "run", "--base", str(base), "--adapter",
                               str(adapter), "--parity", "off", "--no-progress", "--out"],
             "c peft": [py, SELF, "_peft", str(base), str(adapter)]}
    print("each case: own subprocess, base read once first (warm page cache), fresh output folder, no fsync")
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for i, (name, cmd) in ((i, case) for i in range(args.repeat) for case in cases.items()):
        tag = name.split()[0]
        out = workdir / f"out_{tag}"
        shutil.rmtree(out, ignore_errors=True)
        warm(base, adapter)
        r = measure(name, cmd + [str(out)], workdir / f"log_{tag}.txt")
        runs[name].append(r)
        print(f"  {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, other load "
              f"{r['other_load_cores']:.2f} cores", flush=True)
        if tag != "a" and i == 0:
            child("_extract", str(out), str(workdir / f"check_{tag}.safetensors"), *check)
        shutil.rmtree(out)
    child("_extract", str(base), str(workdir / "check_base.safetensors"), *check)
    rows = [{**min(rs, key=lambda r: r["wall_s"]), "runs": len(rs),
             **{k: max(r[k] for r in rs) for k in ("peak_rss_mb", "peak_anon_mb", "kernel_maxrss_mb")}}
            for rs in runs.values()]

    if any(r["other_load_cores"] > 0.2 for r in rows):
        print("\nWARNING: other processes used > 0.2 cores during a case: its time is unreliable (see other load)")
    print(f"\n{'case':<15}{'wall s':>8}{'peak RSS MB':>13}{'peak anon MB':>14}{'kernel maxrss MB':>18}"
          f"{'CPU s':>8}{'other load':>12}")
    for r in rows:
        print(f"{r['case']:<15}{r['wall_s']:>8.2f}{r['peak_rss_mb']:>13.0f}{r['peak_anon_mb']:>14.0f}"
              f"{r['kernel_maxrss_mb']:>18.0f}{r['cpu_s']:>8.1f}{r['other_load_cores']:>12.2f}")
    a, b, c = rows
    values = {"peft/lora time": c["wall_s"] / b["wall_s"], "lora/peft peak RSS": b["peak_rss_mb"] / c["peak_rss_mb"],
              "lora/copy time": b["wall_s"] / a["wall_s"]}
    ratios = {key: {"value": v, "target": f"{TARGETS[key][0]} {TARGETS[key][1]}",
                    "result": "PASS" if (v >= TARGETS[key][1]) == (TARGETS[key][0] == ">=") else "MISS"}
              for key, v in values.items()}
    print("\n" + "\n".join(f"{k:<20}{r['value']:>7.3f}   target {r['target']:<7} {r['result']}"
                           for k, r in ratios.items()))

    import torch
    from safetensors.torch import load_file

    print("\nmerged tensors, lora-export vs PEFT (compared in fp32):")
    got = {tag: load_file(workdir / f"check_{tag}.safetensors") for tag in ("b", "c", "base")}
    agreement = {}
    for name in check:
        x, y, w = (got[tag][name].float() for tag in ("b", "c", "base"))
        diff = (x - y).abs()
        ulp = torch.ldexp(torch.ones_like(x), torch.frexp(torch.maximum(x.abs(), y.abs()))[1] - 8)  # bf16 spacing
        agreement[name] = {"max_abs_diff": float(diff.max()), "max_bf16_ulps": float((diff / ulp).max()),
                           "frac_differing": float((diff > 0).float().mean()),
                           "frac_changed_by_merge": float((x != w).float().mean())}
        print(f"  {name:<42} max|Δ| {diff.max():.3g} = {agreement[name]['max_bf16_ulps']:.2f} bf16 ulp, differing "
              f"{agreement[name]['frac_differing']:.3%} (merge changed {agreement[name]['frac_changed_by_merge']:.1%})")
    total = time.perf_counter() - t_start
    print(f"\nwhole script: {total:.1f} s")
    result = {"size_gb": args.size_gb, "layers": layers, "cases": rows, "ratios": ratios, "agreement": agreement,
              "all_runs": runs, "script_s": total, "notes": "warm page cache before each case; no fsync"}
    (workdir / "bench_merge.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {workdir / 'bench_merge.json'}")


if __name__ == "__main__":
    run_script({"_build": child_build, "_copy": child_copy, "_peft": child_peft, "_extract": child_extract}, main)
