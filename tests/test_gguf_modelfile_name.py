"""Where the Ollama Modelfile goes: one GGUF in the run gets the plain name Ollama looks for (`ollama create -f
Modelfile` and `ollama create` in the folder both read "Modelfile"); several GGUFs get one Modelfile.<type> each,
each naming its own file."""

from __future__ import annotations

import pytest

from conftest import LLAMA_64, build_peft_adapter, run_export
from exporter.demo import build_tokenizer

pytest.importorskip("gguf")


def _base(folder):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    build_tokenizer(folder, vocab_size=128, family="llama-bpe")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_64)).save_pretrained(folder)
    return folder


def test_one_gguf_gets_the_plain_modelfile_and_two_get_one_each(tmp_path):
    """--to gguf:q8_0 alone writes "Modelfile" (FROM ./model-Q8_0.gguf) and no Modelfile.<type>; gguf:q8_0 with
    gguf:f16 writes Modelfile.q8_0 and Modelfile.f16, each FROM its own file, and no plain Modelfile."""
    base = _base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    run_export(base, adapter, tmp_path / "one", formats=("gguf:q8_0",), parity=False)
    names = {p.name for p in (tmp_path / "one").iterdir()}
    assert "Modelfile" in names and not any(n.startswith("Modelfile.") for n in names), names
    assert (tmp_path / "one" / "Modelfile").read_text().splitlines()[0] == "FROM ./model-Q8_0.gguf"

    run_export(base, adapter, tmp_path / "two", formats=("gguf:q8_0", "gguf:f16"), parity=False)
    names = {p.name for p in (tmp_path / "two").iterdir()}
    assert {n for n in names if n.startswith("Modelfile")} == {"Modelfile.q8_0", "Modelfile.f16"}, names
    for variant, file in (("q8_0", "model-Q8_0.gguf"), ("f16", "model-F16.gguf")):
        assert (tmp_path / "two" / f"Modelfile.{variant}").read_text().splitlines()[0] == f"FROM ./{file}"
