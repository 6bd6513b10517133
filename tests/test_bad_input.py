"""Bad input: one clear line naming the file, the problem and the fix; a non-zero exit; nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import build_peft_adapter, build_tiny_base
from exporter.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    base = build_tiny_base(root / "base")
    adapter = build_peft_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, adapter


def copy_adapter(adapter: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapter, tmp_path / "adapter"))


def run_cli(base: Path, adapter: Path, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["-q", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                                       "--no-progress", *extra])
    return result


def assert_clean_failure(result, out: Path, *must_mention: str) -> None:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # an ExportError, not a traceback
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for text in must_mention:
        assert text in lines[0], lines[0]
    assert "Fix:" in lines[0]
    assert not out.exists() or not any(out.iterdir()), "output was written"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
    assert not leftovers, leftovers


def test_good_input_succeeds(good, tmp_path):
    base, adapter = good
    result = run_cli(base, adapter, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and (tmp_path / "out" / "report.json").is_file()


def test_missing_adapter_config(good, tmp_path):
    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    (adapter / "adapter_config.json").unlink()
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out", "adapter_config.json",
                         str(adapter))


def test_truncated_adapter_safetensors(good, tmp_path):
    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out", str(path), "truncated")


def test_shape_mismatch_lists_every_module(good, tmp_path):
    _, adapter = good
    other_base = build_tiny_base(tmp_path / "other", "qwen2")
    cfg = json.loads((other_base / "config.json").read_text())
    assert cfg["hidden_size"] == 32
    # a base with a different width: rebuild qwen2 at hidden 48
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 48, 96
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    result = run_cli(tmp_path / "wide", adapter, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", "does not fit the base model")
    line = result.output
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            assert f"model.layers.{layer}.self_attn.{proj}" in line


def test_nan_in_lora_b(good, tmp_path):
    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    save_file(tensors, path)
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out",
                         "model.layers.1.self_attn.v_proj.weight", "lora_B", "NaN")


def test_pattern_key_matching_nothing(good, tmp_path):
    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_prj": 4}  # typo: PEFT would ignore it silently
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out", "rank_pattern 'q_prj'",
                         "adapter_config.json")


def test_pickle_adapter_needs_allow_pickle(good, tmp_path):
    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out", "adapter_model.bin",
                         "--allow-pickle")
    result = run_cli(base, adapter, tmp_path / "out2", "--allow-pickle")
    assert result.exit_code == 0, result.output


def test_existing_output_folder_is_refused(good, tmp_path):
    base, adapter = good
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli(base, adapter, out)
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    result = run_cli(base, adapter, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


def test_missing_base_in_cache_is_a_clear_error(good, tmp_path, monkeypatch):
    _, adapter = good
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_cli("nobody/no-such-model", adapter, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", "nobody/no-such-model", "local Hugging Face cache")


def test_base_in_hf_cache_is_found_offline(good, tmp_path, monkeypatch):
    """A model id already in the local HF cache resolves without any network."""
    base, adapter = good
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(base, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("acme/tiny", adapter, tmp_path / "out")
    assert result.exit_code == 0, result.output
