"""Benchmark GGUF conversion of a merged model against a plain copy of the same bytes.

For each --sizes (GB, default 0.5 and 1.2), builds (or reuses) in --workdir a seeded bf16 llama-shaped merged folder
(bench_merge's builder, plus a small tokenizer), then in separate subprocesses, page cache warm before each:
  (a) copy   shutil.copyfile of the folder's safetensors shards: the I/O floor
  (b) f16    converters.gguf.writer.write_gguf(folder, out, "f16")
  (c) q8_0   the same with Q8_0 blocks
Targets (reported, never asserted): (b)/(a) wall time <= 2 on the largest size; peak RSS flat in model size, i.e. the
F16 conversion's peak RSS grows by less than 25% from the smallest to the largest size while the model grows 2.4x.
Results also go to <workdir>/bench_gguf.json.
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
from bench_merge import ENV, measure, warm  # noqa: E402  (the same measuring method for both benchmarks)


def child_build(folder: str, size_gb: str) -> None:
    from bench_merge import child_build as build_base_and_adapter

    from exporter.demo import build_tokenizer

    build_base_and_adapter(folder, size_gb)
    shutil.rmtree(Path(folder) / "adapter")  # a merged model is just a model: the base stands in for it
    build_tokenizer(Path(folder) / "base", vocab_size=320)


def child_copy(folder: str, out: str) -> None:
    Path(out).mkdir()
    for shard in sorted(Path(folder).glob("*.safetensors")):
        shutil.copyfile(shard, Path(out) / shard.name)


def child_convert(folder: str, out: str, type_name: str) -> None:
    from converters.gguf.writer import write_gguf

    Path(out).mkdir()
    write_gguf(Path(folder), Path(out) / f"model-{type_name}.gguf", type_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5,1.2", help="model sizes in GB, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_gguf"))
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
        rows = []
        for name, extra in (("a copy", ["_copy"]), ("b f16", ["_convert"]), ("c q8_0", ["_convert"])):
            out = folder / f"out-{name.split()[1]}"
            shutil.rmtree(out, ignore_errors=True)
            warm(model)
            cmd = [sys.executable, SELF, *extra, str(model), str(out)] + ([name.split()[1]] if extra == ["_convert"]
                                                                           else [])
            rows.append(measure(name, cmd, folder / f"log-{name.split()[1]}.txt"))
            written = sum(f.stat().st_size for f in out.iterdir())
            rows[-1]["output_gb"] = written / 1e9
            shutil.rmtree(out)
            print(f"{size} GB  {name:<7} {rows[-1]['wall_s']:6.2f} s  peak RSS {rows[-1]['peak_rss_mb']:6.0f} MB  "
                  f"(anon {rows[-1]['peak_anon_mb']:5.0f} MB)  wrote {written / 1e9:.2f} GB  "
                  f"other load {rows[-1]['other_load_cores']:.2f}", flush=True)
        results[size] = {"model_gb": nbytes / 1e9, "cases": rows,
                         "f16/copy time": rows[1]["wall_s"] / rows[0]["wall_s"],
                         "q8_0/copy time": rows[2]["wall_s"] / rows[0]["wall_s"]}
    sizes = sorted(results)
    small, large = results[sizes[0]], results[sizes[-1]]
    rss_growth = large["cases"][1]["peak_rss_mb"] / small["cases"][1]["peak_rss_mb"]
    summary = {
        "f16/copy time (largest)": (large["f16/copy time"], "<= 2", large["f16/copy time"] <= 2),
        "q8_0/copy time (largest)": (large["q8_0/copy time"], "reported", True),
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
         "notes": "warm page cache before each case; wall includes interpreter start and imports; no fsync",
         "script_s": total}, indent=2) + "\n")
    print(f"\nwhole script: {total:.1f} s; wrote {workdir / 'bench_gguf.json'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    children = {"_build": child_build, "_copy": child_copy, "_convert": child_convert}
    if len(sys.argv) > 1 and sys.argv[1] in children:
        children[sys.argv[1]](*sys.argv[2:])
    else:
        main()
