"""Benchmark GGUF conversion of a merged model against a plain copy of the same bytes.

For each --sizes (GB, default 0.5 and 1.2), builds (or reuses) in --workdir a seeded bf16 llama-shaped merged folder
(bench_merge's builder, plus a small tokenizer), then runs each case --repeat times, interleaved, each in its own
subprocess with the page cache warm and no dirty pages left by the case before (sync):
  (a) copy   shutil.copyfile of the folder's safetensors shards: the I/O floor
  (b) f16    converters.gguf.writer.write_gguf(folder, out, "f16")
  (c) q8_0   the same with Q8_0 blocks
Each child also times its own work after its imports ("work"): the conversion as it runs inside `lora-export run`,
where torch is already loaded. Medians are reported.
Targets (reported, never asserted): (b)/(a) work time <= 2 on the largest size (the whole-process wall ratio, which
adds torch's ~1.3 s import, is reported beside it); peak RSS flat in model size, i.e. the F16 conversion's peak RSS
grows by less than 25% from the smallest to the largest size while the model grows 2.4x.
Results also go to <workdir>/bench_gguf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parent.parent
sys.path.insert(0, str(Path(SELF).parent))
from bench_merge import ENV, measure, warm  # noqa: E402  (the same measuring method for both benchmarks)


def child_build(folder: str, size_gb: str) -> None:
    from bench_merge import child_build as build_base_and_adapter

    from exporter.demo import build_tokenizer

    build_base_and_adapter(folder, size_gb)
    shutil.rmtree(Path(folder) / "adapter")  # a merged model is just a model: the base stands in for it
    build_tokenizer(Path(folder) / "base", vocab_size=320)


WORK_MARK = "work_s="


def child_copy(folder: str, out: str) -> None:
    start = time.perf_counter()
    Path(out).mkdir()
    for shard in sorted(Path(folder).glob("*.safetensors")):
        shutil.copyfile(shard, Path(out) / shard.name)
    print(f"{WORK_MARK}{time.perf_counter() - start}")


def child_convert(folder: str, out: str, type_name: str) -> None:
    from converters.gguf.writer import write_gguf

    start = time.perf_counter()
    Path(out).mkdir()
    write_gguf(Path(folder), Path(out) / f"model-{type_name}.gguf", type_name)
    print(f"{WORK_MARK}{time.perf_counter() - start}")


def run_case(name: str, cmd: list[str], model: Path, out: Path, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the previous case's dirty pages would otherwise be flushed during this one
    time.sleep(0.5)
    warm(model)
    row = measure(name, cmd, log)
    row["work_s"] = float(next(line for line in log.read_text().splitlines() if line.startswith(WORK_MARK))
                          .removeprefix(WORK_MARK))
    row["output_gb"] = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    shutil.rmtree(out)
    return row


def summarise(runs: list[dict]) -> dict:
    """Median times, largest memory, over the repeats of one case."""
    return {"case": runs[0]["case"], "runs": len(runs),
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "work_s": statistics.median(r["work_s"] for r in runs),
            "work_s_all": [round(r["work_s"], 3) for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_anon_mb": max(r["peak_anon_mb"] for r in runs),
            "output_gb": runs[0]["output_gb"], "other_load_cores": max(r["other_load_cores"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5,1.2", help="model sizes in GB, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_gguf"))
    parser.add_argument("--repeat", type=int, default=3, help="runs per case, interleaved; medians are reported")
    args = parser.parse_args()
    started, workdir = time.perf_counter(), args.workdir.resolve()
    results = {}
    for size in [float(s) for s in args.sizes.split(",")]:
        folder = workdir / f"size-{size}"
        model = folder / "base"
        meta = model / "bench_meta.json"
        if not (meta.is_file() and json.loads(meta.read_text())["size_gb"] == size):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            subprocess.run([sys.executable, SELF, "_build", str(folder), str(size)], env=ENV, cwd=ROOT, check=True)
        nbytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        cases = {"a copy": ["_copy"], "b f16": ["_convert", "f16"], "c q8_0": ["_convert", "q8_0"]}
        runs: dict[str, list[dict]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, (child, *type_name) in cases.items():
                out = folder / f"out-{name.split()[1]}"
                cmd = [sys.executable, SELF, child, str(model), str(out), *type_name]
                runs[name].append(run_case(name, cmd, model, out, folder / f"log-{name.split()[1]}.txt"))
        rows = [summarise(runs[name]) for name in cases]
        for row in rows:
            print(f"{size} GB  {row['case']:<7} work {row['work_s']:6.2f} s  wall {row['wall_s']:6.2f} s  "
                  f"peak RSS {row['peak_rss_mb']:6.0f} MB (anon {row['peak_anon_mb']:5.0f} MB)  "
                  f"wrote {row['output_gb']:.2f} GB  runs {row['work_s_all']}  other load {row['other_load_cores']:.2f}",
                  flush=True)
        results[size] = {"model_gb": nbytes / 1e9, "cases": rows,
                         "f16/copy work": rows[1]["work_s"] / rows[0]["work_s"],
                         "f16/copy wall": rows[1]["wall_s"] / rows[0]["wall_s"],
                         "q8_0/copy work": rows[2]["work_s"] / rows[0]["work_s"]}
    sizes = sorted(results)
    small, large = results[sizes[0]], results[sizes[-1]]
    rss_growth = large["cases"][1]["peak_rss_mb"] / small["cases"][1]["peak_rss_mb"]
    summary = {
        "f16/copy work (largest)": (large["f16/copy work"], "<= 2", large["f16/copy work"] <= 2),
        "f16/copy wall (largest)": (large["f16/copy wall"], "reported", True),
        "q8_0/copy work (largest)": (large["q8_0/copy work"], "reported", True),
        "f16 peak RSS largest/smallest": (rss_growth, "<= 1.25", rss_growth <= 1.25),
        "model size largest/smallest": (large["model_gb"] / small["model_gb"], "", True),
    }
    print()
    for key, (value, target, ok) in summary.items():
        print(f"{key:<32}{value:7.3f}   {('target ' + target) if target else '':<14}"
              f"{'' if not target or target == 'reported' else ('PASS' if ok else 'MISS')}")
    total = time.perf_counter() - started
    (workdir / "bench_gguf.json").write_text(json.dumps(
        {"sizes": results, "summary": {k: {"value": v, "target": t, "pass": ok} for k, (v, t, ok) in summary.items()},
         "notes": "medians of interleaved repeats; sync, then warm page cache before each case; work: timed "
                  "inside the child after its imports; wall: the whole process (interpreter start, imports); no fsync",
         "script_s": total}, indent=2) + "\n")
    print(f"\nwhole script: {total:.1f} s; wrote {workdir / 'bench_gguf.json'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    children = {"_build": child_build, "_copy": child_copy, "_convert": child_convert}
    if len(sys.argv) > 1 and sys.argv[1] in children:
        children[sys.argv[1]](*sys.argv[2:])
    else:
        main()
