"""Benchmark the Hub path: `lora-export run --base org/base --adapter org/lora --push-to me/model` against what the
same work costs without lora-export's Hub handling, all on a local Hub-protocol server (tests/hub_server.py, on
127.0.0.1, in this process) so that no network is timed.

Builds (or reuses) in --workdir scripts/bench_merge.py's seeded llama-shaped bf16 base of --size-gb and its r=16 LoRA,
puts both on the server, then runs, each in its own subprocess with a fresh huggingface_hub cache:
  (a) download: huggingface_hub's snapshot_download of both repositories, every file (what a user would script);
  (b) local: `lora-export run` on the local folders, safetensors, parity off (the work itself);
  (c) upload: huggingface_hub's upload_folder of (b)'s output to a new repository;
  (d) hub: `lora-export run --base org/base --adapter org/lora --push-to me/model`, safetensors, parity off: the same
      three steps in one command (download only what the run reads, merge, card + sha256 of every file, push).
Target, reported as PASS/MISS and never asserted: (d) / ((a) + (b) + (c)) wall time <= 1.15 (the Hub handling adds
at most 15% to doing the steps by hand). Peak RSS of each child (the server's memory is this process's, not counted).
Also a resumed push: (e) the push of (d), in about five shards, killed after its first LFS object, then (f) the same
command again: (f) rebuilds nothing, sends only the missing objects, and its time is compared with (c).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_merge  # noqa: E402  (scripts/: the model builder, the measuring)
from hub_server import HubServer  # noqa: E402

TARGET = 1.15


def child_download(cache: str) -> None:
    from huggingface_hub import snapshot_download

    for repo in ("org/base", "org/lora"):
        snapshot_download(repo, cache_dir=cache)


def child_upload(folder: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("me/by-hand", exist_ok=True)
    api.upload_folder(repo_id="me/by-hand", folder_path=folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-hub"))
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    base, adapter = workdir / "base", workdir / "adapter"
    meta = base / "bench_meta.json"
    if not (meta.is_file() and json.loads(meta.read_text())["size_gb"] == args.size_gb and adapter.is_dir()):
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        bench_merge.child("_build", str(workdir), str(args.size_gb), script=bench_merge.SELF)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/base"}))
    size = sum(f.stat().st_size for f in base.iterdir()) / 1e9
    print(f"base: {size:.2f} GB bf16 in {len(list(base.glob('*.safetensors')))} shards")

    store = workdir / "hub-store"
    shutil.rmtree(store, ignore_errors=True)
    server = HubServer(store)
    server.add_repo_from_folder("org/base", base)
    server.add_repo_from_folder("org/lora", adapter)
    env = {"HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_bench",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    bench_merge.ENV.update(env)
    py, exe = sys.executable, str(Path(sys.executable).parent / "lora-export")
    results: dict[str, dict] = {}

    def case(name: str, cmd: list[str], cache: str) -> dict:
        shutil.rmtree(cache, ignore_errors=True)
        bench_merge.ENV["HF_HUB_CACHE"] = cache
        r = bench_merge.measure(name, cmd, workdir / f"log_{name.split()[0]}.txt")
        results[name] = r
        print(f"  {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, other load "
              f"{r['other_load_cores']:.2f} cores", flush=True)
        return r

    out_local, out_hub = workdir / "out_local", workdir / "out_hub"
    for out in (out_local, out_hub):
        shutil.rmtree(out, ignore_errors=True)
    a = case("a download", [py, SELF, "_download", str(workdir / "cache_a")], str(workdir / "cache_a"))
    b = case("b local run", [exe, "run", "--base", str(base), "--adapter", str(adapter), "--to", "safetensors",
                             "--parity", "off", "--no-progress", "--out", str(out_local)], str(workdir / "cache_b"))
    c = case("c upload", [py, SELF, "_upload", str(out_local)], str(workdir / "cache_c"))
    hub_cmd = [exe, "run", "--base", "org/base", "--adapter", "org/lora", "--to", "safetensors", "--parity", "off",
               "--no-progress", "--push-to", "me/model", "--out", str(out_hub)]
    d = case("d hub run", hub_cmd, str(workdir / "cache_d"))
    same = all(server.read("me/model", name) == (out_hub / name).read_bytes()
               for name in server.files("me/model") if name.endswith(".safetensors"))
    ratio = d["wall_s"] / (a["wall_s"] + b["wall_s"] + c["wall_s"])
    print(f"hub run / (download + local run + upload): {ratio:.2f} (target <= {TARGET}: "
          f"{'PASS' if ratio <= TARGET else 'MISS'}); pushed shards equal the output: {same}")

    # A push killed after its first LFS object, then the same command again.
    shutil.rmtree(out_hub)
    hub_cmd[hub_cmd.index("me/model")] = "me/resumed"
    hub_cmd += ["--max-shard-size", f"{max(1, int(size * 1000 / 5))}MB"]  # about five shards to send
    server.fail_lfs_uploads_after(1)
    try:
        case("e killed push", hub_cmd, str(workdir / "cache_e"))
    except SystemExit:
        print("  e killed push: failed as arranged")
    server.clear_faults()
    server.reset_log()
    f = bench_merge.measure("f resumed push", hub_cmd, workdir / "log_f.txt")
    sent = len(server.lfs_uploads)
    shards = len(list(out_hub.glob("*.safetensors")))
    print(f"  f resumed push: {f['wall_s']:.1f} s ({f['wall_s'] / c['wall_s']:.2f} x the upload by hand), "
          f"sent {sent} of {shards} shards (the rest were on the server)")
    results["f resumed push"] = f | {"lfs_objects_sent": sent, "shards": shards}
    server.stop()
    (workdir / "bench_hub.json").write_text(json.dumps({"ratio": ratio, "target": TARGET, "cases": results}, indent=1))


if __name__ == "__main__":
    bench_merge.run_script({"_download": child_download, "_upload": child_upload}, main)
