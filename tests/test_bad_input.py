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


def assert_clean_failure(result, out: Path, *must_mention: str, exit_code: int = 2) -> None:
    assert result.exit_code == exit_code, result.output
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


class NotATensor:
    """Anything but tensors and plain containers in a pickle: what weights_only=True exists to refuse (a real attack
    would make unpickling run code; this class is only importable, which is enough for the check)."""


@pytest.mark.parametrize("damage, detail", [
    ("garbage", "(Unsupported operand 103)."),
    ("truncated", "(PytorchStreamReader failed reading zip archive: failed finding central directory."),
    ("empty", "(EOFError: it ends early)."),
])
def test_a_pickle_that_is_not_one_is_refused_in_one_line(good, tmp_path, damage, detail):
    """torch's messages run to a paragraph: the one line saying what it met is kept."""
    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    target = adapter / "adapter_model.bin"
    if damage == "garbage":
        target.write_bytes(b"\x80\x02garbage, not a pickle")
    elif damage == "truncated":
        torch.save(tensors, target)
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.write_bytes(b"")
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out", "--allow-pickle"), tmp_path / "out",
                         f"adapter_model.bin: cannot be loaded {detail}", "Fix: re-save the adapter.")


def test_a_pickle_with_objects_is_refused_even_with_allow_pickle(good, tmp_path):
    from exporter.adapter import load_adapter
    from exporter.parity.reference import read_adapter_terms

    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "extra": NotATensor()}, adapter / "adapter_model.bin")
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out", "--allow-pickle"), tmp_path / "out",
                         "adapter_model.bin: holds objects other than tensors, which lora-export never unpickles",
                         "Unsupported global: GLOBAL test_bad_input.NotATensor was not an allowed global by default)",
                         "Fix: re-save the adapter's tensors as safetensors.")
    # The library's defaults refuse a pickle outright, and its readers (the merge's and parity's) load tensors only.
    with pytest.raises(Exception, match="allow-pickle|allow_pickle"):
        load_adapter(adapter)
    with pytest.raises(FileNotFoundError):
        read_adapter_terms(adapter)
    from exporter.parity.reference import load_reference

    with pytest.raises(FileNotFoundError):
        load_reference(base, adapter, torch.device("cpu"))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        read_adapter_terms(adapter, allow_pickle=True)


def test_existing_output_folder_is_refused(good, tmp_path):
    base, adapter = good
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli(base, adapter, out)
    # README's exit codes: 2 for bad input, an --out that is not empty among them; one line naming it and the fix.
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "Fix:" in errors[0] and "--overwrite" in errors[0], errors
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


# --- every documented refusal: exit 2, one line naming the file and the problem, a fix, nothing written -------------

def _edit_config(**changes):
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _edit_tensors(change):
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return edit


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
ADAPTER_REFUSALS = {
    "not LoRA": (_edit_config(peft_type="IA3"), ["adapter_config.json", "peft_type is IA3"]),
    "layer_replication": (_edit_config(layer_replication=[[0, 2], [1, 2]]), ["'layer_replication' is set"]),
    "trainable tokens": (_edit_config(trainable_token_indices=[3, 4]), ["'trainable_token_indices' is set"]),
    "target_parameters": (_edit_config(target_parameters=["mlp.experts.down_proj"]), ["'target_parameters' is set"]),
    "A without B": (_edit_tensors(lambda t: t.pop(f"{Q0}.lora_B.weight")),
                    ["model.layers.0.self_attn.q_proj", "not a complete A/B pair"]),
    "embedding A without B": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)})),
        ["model.embed_tokens", "not a complete A/B pair"]),
    "rank differs from r": (_edit_config(r=16), ["has rank 4 in its tensors, but the config gives r=16"]),
    "rank differs from rank_pattern": (_edit_config(rank_pattern={"v_proj": 2}),
                                       ["rank 4 in its tensors", "r=2 (rank_pattern key 'v_proj')"]),
    "use_dora without magnitudes": (_edit_config(use_dora=True), ["use_dora", "no lora_magnitude_vector"]),
    "unused alpha_pattern key": (_edit_config(alpha_pattern={"v_prj": 4}), ["alpha_pattern 'v_prj'",
                                                                            "match(es) no adapted module"]),
    "empty adapter": (_edit_tensors(lambda t: t.clear()), ["holds no LoRA tensors"]),
    "unknown LoRA tensor": (_edit_tensors(lambda t: t.update({f"{Q0}.lora_C.weight": torch.zeros(2, 2)})),
                            ["does not know how to merge", "lora_C"]),
    "config not JSON": (lambda a: (a / "adapter_config.json").write_text("{'r': 8"), ["is not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_REFUSALS))
def test_adapter_refusal(good, tmp_path, case):
    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    mutate, fragments = ADAPTER_REFUSALS[case]
    mutate(adapter)
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out", *fragments)


def test_dora_on_an_embedding_is_refused(good, tmp_path):
    base, _ = good
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, use_dora=True,
                                 target_modules=["embed_tokens"])
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out", "model.embed_tokens",
                         "DoRA on an embedding")


def _sharded_base(tmp_path: Path) -> Path:
    return build_tiny_base(tmp_path / "sharded", max_shard_size="20kB")


def _shards(base: Path) -> list[str]:
    return sorted(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()))


def _base_only_bin(base: Path) -> None:
    from safetensors.torch import load_file as load

    torch.save(load(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()


def _gptq_config(base: Path) -> None:
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))


BASE_REFUSALS = {
    "no config.json": (False, lambda b: (b / "config.json").unlink(), ["config.json", "is missing"]),
    "config.json not JSON": (False, lambda b: (b / "config.json").write_text("{"), ["config.json", "not valid JSON"]),
    "only a pickle": (False, _base_only_bin, ["no *.safetensors weights", "pytorch_model.bin", "a pickle"]),
    "shards without their index": (True, lambda b: (b / "model.safetensors.index.json").unlink(),
                                   ["no model.safetensors.index.json", "restore the index file"]),
    "index names a missing shard": (True, lambda b: (b / _shards(b)[1]).unlink(),
                                    ["model.safetensors.index.json", "-of-", "does not exist"]),
    "truncated shard": (True, lambda b: (b / _shards(b)[0]).write_bytes((b / _shards(b)[0]).read_bytes()[:-64]),
                        ["-of-", "truncated"]),
    "GPTQ base": (False, _gptq_config, ["config.json", "GPTQ-quantized"]),
}


@pytest.mark.parametrize("case", sorted(BASE_REFUSALS))
def test_base_refusal(good, tmp_path, case):
    _, adapter = good
    sharded, mutate, fragments = BASE_REFUSALS[case]
    base = _sharded_base(tmp_path) if sharded else Path(shutil.copytree(good[0], tmp_path / "base"))
    if sharded:
        assert len(_shards(base)) >= 3
    mutate(base)
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out", *fragments)


def test_sharded_base_merges_like_peft(good, tmp_path):
    from conftest import load_output, peft_merged_state

    _, adapter = good
    base = _sharded_base(tmp_path)
    assert len(_shards(base)) >= 3
    result = run_cli(base, adapter, tmp_path / "out", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    ours, peft = load_output(tmp_path / "out"), peft_merged_state(base, adapter)
    assert set(ours) == set(peft)
    assert max(float((ours[n] - peft[n]).abs().max()) for n in ours) <= 1e-6


def test_tokenizer_larger_than_the_embedding_is_refused(good, tmp_path):
    from exporter.demo import build_tokenizer

    base, adapter = good
    base = Path(shutil.copytree(base, tmp_path / "base"))
    build_tokenizer(base, vocab_size=200)  # the model has 128 embedding rows
    assert_clean_failure(run_cli(base, adapter, tmp_path / "out"), tmp_path / "out", "tokenizer.json",
                         "can produce", "128 embedding rows")


def test_inspect_refuses_bad_input_in_one_line(good, tmp_path):
    base, adapter = good
    adapter = copy_adapter(adapter, tmp_path)
    _edit_config(r=16)(adapter)
    result = CliRunner().invoke(main, ["inspect", str(adapter)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.count("error:") == 1 and "r=16" in result.output and "Fix:" in result.output
    result = CliRunner().invoke(main, ["inspect", str(good[1]), "--base", str(tmp_path / "missing")])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "no such folder" in result.output
