"""Boundaries of the load and parity stages that the broader tests step over: a disk with exactly the space the plan
needs, the probes a resized vocabulary adds, and a tokenizer folder that asks to run its own code."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import build_peft_adapter, build_tiny_base, run_export
from exporter.errors import FileSystemError


def test_a_disk_with_exactly_the_needed_bytes_free_is_enough_and_one_byte_less_is_not(tmp_path, monkeypatch):
    """The plan's need is an upper bound on what the run writes: a disk whose free space equals it holds the output
    (refusing it would refuse a run that fits); one byte less is refused with the figures."""
    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2**40))
    need = run_export(base, adapter, tmp_path / "probe", parity=False).inputs.disk["needed_bytes"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need))
    ctx = run_export(base, adapter, tmp_path / "exact", parity=False)
    assert ctx.inputs.disk["free_bytes"] == ctx.inputs.disk["needed_bytes"] == need
    assert (tmp_path / "exact" / "model.safetensors").is_file()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    with pytest.raises(FileSystemError, match="the output needs"):
        run_export(base, adapter, tmp_path / "short", parity=False)


def test_parity_probes_the_rows_a_resized_vocabulary_added(tmp_path, monkeypatch):
    """An adapter that grew the vocabulary from 128 to 136 rows (modules_to_save embed_tokens and lm_head): besides
    the random ids over the whole vocabulary, the reference runs one probe made only of the 8 added ids (128..135),
    the rows the base has no logits for and only the adapter's replacement defines. (The extended tokenizer is saved
    beside the adapter, as training that adds tokens does.)"""
    from transformers import AutoTokenizer

    import exporter.stages.parity as parity_stage
    from exporter.demo import build_tokenizer

    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"],
                                 modules_to_save=["embed_tokens", "lm_head"], resize_vocab_to=136)
    build_tokenizer(tmp_path / "base", vocab_size=128)
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    tok.add_tokens([f"<new{i}>" for i in range(8)])
    tok.save_pretrained(adapter)
    seen: list[list[torch.Tensor]] = []
    real = parity_stage.probe_logits

    def spy(model, probes, device):
        seen.append([p.clone() for p in probes])
        return real(model, probes, device)

    monkeypatch.setattr(parity_stage, "probe_logits", spy)
    run_export(base, adapter, tmp_path / "out")
    assert seen
    reference = max(seen, key=len)  # the reference's probes; the base's leave out what its 128 rows cannot read
    added_only = [p for p in reference if int(p.min()) >= 128]
    assert added_only and all(int(p.max()) < 136 for p in added_only)


def test_parity_never_runs_a_tokenizers_own_code(tmp_path):
    """A tokenizer folder whose tokenizer_config.json maps AutoTokenizer to a Python file beside it: parity loads
    tokenizers with trust_remote_code=False, so transformers refuses the folder and the file's code never runs."""
    from exporter.stages.parity import _tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "evil_tokenizer.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (folder / "tokenizer_config.json").write_text(
        '{"auto_map": {"AutoTokenizer": [null, "evil_tokenizer.EvilTokenizer"]}, '
        '"tokenizer_class": "EvilTokenizer"}')
    (folder / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="trust_remote_code"):
        _tokenizer(folder)
    assert not marker.exists()
