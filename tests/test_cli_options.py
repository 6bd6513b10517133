"""Every option of every command, through the CLI as users type it: what it changes, its exit code, its one-line
error. The fixture is what users have: a bf16 base and a PEFT adapter trained for a few steps (default flags)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import load_output, peft_merged_state, train_adapter
from exporter.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    from exporter.demo import build_base

    root = tmp_path_factory.mktemp("trained")
    base = build_base(root / "base")  # bf16 llama with its own tokenizer and chat template
    adapter = train_adapter(root / "adapter", base, r=8, lora_alpha=16, tokenizer=True,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return base, adapter


def run(base: Path, adapter: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["-q", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                                     "--no-progress", *extra])


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and isinstance(result.exception, SystemExit), result.output
    return lines[0]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dtype_writes_the_fp32_merge_in_that_dtype(trained, tmp_path, dtype):
    base, adapter = trained
    result = run(base, adapter, tmp_path / "out", "--dtype", dtype)
    assert result.exit_code == 0, result.output
    torch_dtype = getattr(torch, dtype)
    ours, peft, original = load_output(tmp_path / "out"), peft_merged_state(base, adapter), load_output(base)
    assert {t.dtype for t in ours.values()} == {torch_dtype}
    changed = 0
    for name, tensor in ours.items():
        if torch.equal(peft[name], original[name].float()):
            assert torch.equal(tensor, original[name].to(torch_dtype)), name  # untouched: only converted
            continue
        changed += 1
        assert torch.equal(tensor, peft[name].to(torch_dtype)), name  # PEFT's fp32 merge, rounded once
    assert changed == 14
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype
    assert report(tmp_path / "out")["artifacts"][0]["parity"]["dtype"] == dtype


def test_device(trained, tmp_path, monkeypatch):
    base, adapter = trained
    result = run(base, adapter, tmp_path / "cpu", "--device", "cpu", "--parity", "off")
    assert result.exit_code == 0 and report(tmp_path / "cpu")["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run(base, adapter, tmp_path / "cuda", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in error_line(result) and not (tmp_path / "cuda").exists()
    result = run(base, adapter, tmp_path / "tpu", "--device", "tpu")
    assert result.exit_code == 2 and "'tpu' is not one of" in result.output


def test_parity_off_writes_no_figures(trained, tmp_path):
    base, adapter = trained
    result = run(base, adapter, tmp_path / "out", "--parity", "off")
    assert result.exit_code == 0 and "PASS" not in result.output
    assert [a["parity"] for a in report(tmp_path / "out")["artifacts"]] == [None]
    assert "Parity was not run." in (tmp_path / "out" / "README.md").read_text()


def test_max_shard_size(trained, tmp_path):
    base, adapter = trained
    result = run(base, adapter, tmp_path / "out", "--max-shard-size", "60kB", "--parity", "off")
    assert result.exit_code == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    sizes = [(tmp_path / "out" / s).stat().st_size for s in shards]
    largest_tensor = max(t.numel() * t.element_size() for t in load_output(base).values())
    assert all(size <= max(60_000, largest_tensor) + 4096 for size in sizes)  # + the header
    result = run(base, adapter, tmp_path / "bad", "--max-shard-size", "big")
    assert result.exit_code == 2 and "is not a size" in error_line(result)


def test_no_check_finite_lets_nan_through(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapter = trained
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"][5, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    result = run(base, broken, tmp_path / "checked")
    assert result.exit_code == 2 and "NaN" in error_line(result)
    result = run(base, broken, tmp_path / "out", "--no-check-finite", "--parity", "off")
    assert result.exit_code == 0, result.output
    v_proj = load_output(tmp_path / "out")["model.layers.0.self_attn.v_proj.weight"]
    assert torch.isnan(v_proj[5]).all() and torch.isfinite(v_proj[:5]).all()  # row 5 of B feeds row 5 of ΔW


@pytest.mark.parametrize("to, message", [
    ("safetensors", "has values beyond what torch.float16 holds"),
    ("gguf:f16", "has values beyond ±65504, which F16 stores as Inf"),
    ("onnx:fp16", "has values beyond what torch.float16 holds. Fix: export onnx:fp32 instead."),
])
def test_values_float16_cannot_hold_are_refused_in_every_format_unless_no_check_finite(trained, tmp_path, to,
                                                                                        message):
    """A merge that is finite in float32 but beyond fp16's ±65504 in one row: each fp16 writer refuses it by name
    (exit 2, nothing written); --no-check-finite writes the Inf the user asked for."""
    from safetensors.torch import load_file, save_file

    base, adapter = trained
    loud = tmp_path / "adapter"
    loud.mkdir()
    (loud / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key][5] = 1e6 * tensors[key][5].sign()  # ΔW row 5 ≈ 1e6 · (A's column sums): far beyond fp16, finite
    save_file(tensors, loud / "adapter_model.safetensors")
    refused = run(base, loud, tmp_path / "out", "--to", to, "--dtype", "float16", "--parity", "off")
    assert refused.exit_code == 2 and message in error_line(refused) and "v_proj" in error_line(refused)
    assert not (tmp_path / "out").exists()
    kept = run(base, loud, tmp_path / "kept", "--to", to, "--dtype", "float16", "--parity", "off",
               "--no-check-finite")
    assert kept.exit_code == 0, kept.output
    if to == "safetensors":
        row = load_output(tmp_path / "kept")["model.layers.0.self_attn.v_proj.weight"][5]
    elif to == "gguf:f16":
        from gguf import GGUFReader

        tensor = next(t for t in GGUFReader(tmp_path / "kept" / "model-F16.gguf").tensors
                      if t.name == "blk.0.attn_v.weight")
        row = torch.from_numpy(tensor.data.copy())[5]
    else:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(tmp_path / "kept" / "onnx" / "model.onnx"))
        weight = next(i for i in model.graph.initializer if i.name.startswith("model.layers.0.self_attn.v_proj.weight"))
        row = torch.from_numpy(numpy_helper.to_array(weight, base_dir=str(tmp_path / "kept" / "onnx")).copy()).T[5]
    assert torch.isinf(row).any()


def test_max_abs_override_fails_with_exit_3_and_keeps_the_figures(trained, tmp_path):
    base, adapter = trained
    out = tmp_path / "out"
    result = run(base, adapter, out, "--dtype", "float32", "--max-abs", "1e-12")
    assert result.exit_code == 3 and "max|Δ|" in error_line(result) and not out.exists()
    failed = json.loads((tmp_path / "out.failed-report.json").read_text())["artifacts"][0]["parity"]
    assert failed["passed"] is False and failed["thresholds"]["max_abs"] == 1e-12 and failed["max_abs"] > 1e-12
    kept = run(base, adapter, tmp_path / "kept", "--dtype", "float32", "--max-abs", "1e-12",
               "--accept-parity-failure")
    assert kept.exit_code == 0 and "FAIL" in kept.output
    assert report(tmp_path / "kept")["artifacts"][0]["parity"]["passed"] is False


def test_max_kl_override(trained, tmp_path):
    base, adapter = trained
    result = run(base, adapter, tmp_path / "tight", "--max-kl", "1e-15")  # bf16 output: KL ~1e-5 here
    assert result.exit_code == 3 and "KL" in error_line(result)
    loose = run(base, adapter, tmp_path / "loose", "--max-kl", "0.5")
    assert loose.exit_code == 0
    assert report(tmp_path / "loose")["artifacts"][0]["parity"]["thresholds"]["max_kl"] == 0.5


def test_min_top1_override_decides_on_a_wrong_merge(trained, tmp_path, monkeypatch):
    """With KL and max|Δ| switched off, only --min-top1 stands between a wrong merge and a pass."""
    from conftest import break_merge_scale

    base, adapter = trained
    break_merge_scale(monkeypatch, lambda scale, rank: -8 * scale)
    lax = ("--max-abs", "1e9", "--max-kl", "1e9")
    result = run(base, adapter, tmp_path / "strict", *lax, "--min-top1", "1.0")
    assert result.exit_code == 3 and "top-1" in error_line(result)
    result = run(base, adapter, tmp_path / "any", *lax, "--min-top1", "0")
    assert result.exit_code == 0, result.output
    parity = report(tmp_path / "any")["artifacts"][0]["parity"]
    assert parity["top1_decisive"] < 1.0 and parity["thresholds"]["min_top1"] == 0
    result = run(base, adapter, tmp_path / "bad", "--min-top1", "1.5")
    assert result.exit_code == 2 and "1.5" in result.output


def test_progress_bars_only_without_no_progress(trained, tmp_path):
    base, adapter = trained
    args = ["run", "--base", str(base), "--adapter", str(adapter), "--parity", "off"]
    shown = CliRunner().invoke(main, ["-q", *args, "--out", str(tmp_path / "a")])
    hidden = CliRunner().invoke(main, ["-q", *args, "--out", str(tmp_path / "b"), "--no-progress"])
    assert shown.exit_code == hidden.exit_code == 0
    assert "merge:" in shown.output and "merge:" not in hidden.output


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_verbosity_flags(trained, tmp_path):
    base, adapter = trained
    common = ["run", "--base", str(base), "--adapter", str(adapter), "--parity", "off", "--no-progress"]
    verbose = _cli("-v", *common, "--out", str(tmp_path / "v"))
    quiet = _cli("-q", *common, "--out", str(tmp_path / "q"))
    assert verbose.returncode == quiet.returncode == 0, verbose.stderr + quiet.stderr
    assert "stage merge done in" in verbose.stderr and "stage" not in quiet.stderr
    assert "wrote" in quiet.stdout


def test_inspect_options(trained):
    base, adapter = trained
    as_json = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(base), "--json"])
    as_fp32 = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(base), "--json", "--dtype", "float32"])
    info, info32 = json.loads(as_json.output), json.loads(as_fp32.output)
    assert info["output_dtype"] == "bfloat16" and info32["output_dtype"] == "float32"
    assert info32["output_bytes"] == 2 * info["output_bytes"]
    assert info["output_bytes"] == sum(t.numel() * 2 for t in load_output(base).values())
    assert {m["scale"] for m in info["modules"]} == {2.0} and len(info["modules"]) == 14
    table = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(base)])
    assert "merged output:" in table.output and "bfloat16" in table.output


_SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call"}


def cli_arguments(source: str) -> set[str]:
    """The strings a module really passes to the CLI, found in its syntax tree (so comments, docstrings and strings
    used anywhere else do not count): the arguments of ``….invoke(…)`` (click's CliRunner), of a subprocess call whose
    arguments run the CLI (``-m exporter.cli``, ``lora-export``, code importing ``exporter.cli``), and of calls to
    the module's own functions that make such a call. A name among the arguments stands for every value assigned to
    it in the enclosing functions or the module (``common = [...]; run(*common)``), a loop variable for what it
    iterates over."""
    import ast

    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    scopes: dict[ast.AST, dict[str, list[ast.AST]]] = {}
    for node in ast.walk(tree):
        targets: list[tuple[ast.AST, ast.AST]] = []
        if isinstance(node, ast.Assign):
            targets = [(t, node.value) for t in node.targets]
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            targets = [(node.target, node.value)]
        elif isinstance(node, (ast.For, ast.comprehension)):
            targets = [(node.target, node.iter)]
        for target, value in targets:
            if isinstance(target, ast.Name):
                scope = parents.get(node)
                while not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Module)):
                    scope = parents[scope]
                scopes.setdefault(scope, {}).setdefault(target.id, []).append(value)

    def strings(expr: ast.AST, seen: set[int]) -> set[str]:
        """String constants reachable from ``expr``, names resolved through the scopes around it."""
        found: set[str] = set()
        for node in ast.walk(expr):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
            elif isinstance(node, ast.Name) and id(node) not in seen:
                seen.add(id(node))
                scope = parents.get(node)
                while scope is not None:
                    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Module)) and \
                            node.id in scopes.get(scope, {}):
                        for value in scopes[scope][node.id]:
                            found |= strings(value, seen)
                        break
                    scope = parents.get(scope)
        return found

    def arguments(call: ast.Call) -> set[str]:
        return set().union(*(strings(a, set()) for a in [*call.args, *(k.value for k in call.keywords)]))

    def runs_cli(call: ast.Call, helpers: set[str]) -> bool:
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr == "invoke":
            return True
        if isinstance(func, ast.Attribute) and func.attr in _SUBPROCESS_CALLS and \
                isinstance(func.value, ast.Name) and func.value.id == "subprocess":
            return any(s == "lora-export" or "exporter.cli" in s for s in arguments(call))
        return isinstance(func, ast.Name) and func.id in helpers

    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    helpers: set[str] = set()
    while True:  # functions that run the CLI, directly or through another such function
        more = {f.name for f in functions if any(isinstance(n, ast.Call) and runs_cli(n, helpers)
                                                  for n in ast.walk(f))}
        if more <= helpers:
            break
        helpers |= more
    return set().union(*(arguments(c) for c in calls if runs_cli(c, helpers)))


def test_cli_arguments_counts_only_what_reaches_the_cli():
    source = '''
"""--json in a docstring"""
import subprocess, sys
from click.testing import CliRunner
from exporter.cli import main

def run(*extra):  # --overwrite in a comment
    return CliRunner().invoke(main, ["-q", "run", *extra])

def _child(*args):
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args])

def other(*args):
    return subprocess.run(["ls", "--parity", *args])

def test_a():
    common = ["--base", "b"]
    for flag in ("--dtype", "--device"):
        run(*common, flag, "x")
    _child("--max-kl", "1")
    other("--gguf-pre")
    print("--allow-pickle")
    code = "from exporter.cli import main; main()"
    subprocess.Popen([sys.executable, "-c", code, "--to", "gguf"])
'''
    options = {s for s in cli_arguments(source) if s.startswith("-")}
    # python's own -m and -c are among a subprocess's arguments too (no option of ours is named so)
    assert options == {"-q", "--base", "--dtype", "--device", "--max-kl", "--to", "-m", "-c"}


def test_every_option_of_every_command_is_exercised():
    """A new option must come with a test that passes it to the CLI (a flag that only appears in a comment, a
    docstring or a README check does not count)."""
    import click

    passed: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        passed |= {s.split("=", 1)[0] for s in cli_arguments(path.read_text())}
    missing = []
    for command in [main, *main.commands.values()]:
        for param in command.params:
            if isinstance(param, click.Option) and not any(flag in passed for flag in param.opts):
                missing.append(f"{command.name} {param.opts[0]}")
    assert not missing, missing


def test_demo_keeps_its_inputs_with_out(tmp_path):
    result = CliRunner().invoke(main, ["-q", "demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "inputs" / "base" / "config.json").is_file()
    assert (tmp_path / "inputs" / "adapter" / "adapter_config.json").is_file()
    assert math.isfinite(report(tmp_path / "merged")["artifacts"][0]["parity"]["kl"])
