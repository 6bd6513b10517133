"""The disk pre-flight's figures against the files the run then writes, for every format and variant.

exporter/stages/load.py refuses a run whose outputs cannot fit before anything is merged, from each format's
``output_bytes`` estimate. An estimate below the real size lets a run start that then fills the disk at the end; one far
above it refuses runs that would fit. So each estimate must be an upper bound of what its files hold, and a close one:
within 15% (plus 64 KiB of headers and padding) at a shape where weights, not headers, make the bytes — wider than the
other tests' tiny models, still written in a second or two.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_export, train_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WIDE = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.05)

# request -> the files under the output folder that hold it (relative glob)
CASES = {
    "safetensors": "model*.safetensors",
    "safetensors:nf4": "nf4/model*.safetensors",
    "safetensors:fp4-dq": "fp4-dq/model*.safetensors",
    "safetensors:int8": "int8/model*.safetensors",
    "gguf:f32": "model-F32.gguf",
    "gguf:bf16": "model-BF16.gguf",
    "gguf:q8_0": "model-Q8_0.gguf",
    "gguf:q4_k_m": "model-Q4_K_M.gguf",
    "gguf:q6_k": "model-Q6_K.gguf",
    "onnx:fp32": "onnx-fp32/model.onnx*",
    "onnx:fp16": "onnx-fp16/model.onnx*",
    "gguf-lora": "adapter.gguf",
}


def _base(folder, tie: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from exporter.demo import build_tokenizer

    build_tokenizer(folder, vocab_size=WIDE["vocab_size"], family="llama-bpe")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**WIDE, tie_word_embeddings=tie))
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exported(request, tmp_path_factory):
    """Every case written in one run from a bf16 base with a trained adapter, default flags; its output folder."""
    tmp = tmp_path_factory.mktemp("estimates")
    base = _base(tmp / "base", tie=request.param)
    adapter = train_adapter(tmp / "adapter", base, steps=2, r=8, lora_alpha=16, target_modules="all-linear")
    run_export(base, adapter, tmp / "out", formats=tuple(CASES))
    return tmp / "out"


@pytest.mark.parametrize("case", list(CASES))
def test_each_estimate_bounds_its_files_closely(exported, case):
    """report.json's planned bytes (what the pre-flight counted on) against the bytes on disk."""
    planned = json.loads((exported / "report.json").read_text())["inputs"]["disk"]["planned_bytes"]
    assert sorted(planned) == sorted(CASES)
    files = [p for p in exported.glob(CASES[case]) if p.is_file()]
    assert files, f"no file matches {CASES[case]} under {exported}"
    written = sum(p.stat().st_size for p in files)
    assert isinstance(planned[case], int)
    assert written <= planned[case] <= 1.15 * written + 64 * 1024, (case, planned[case], written)
