"""Fixtures: tiny fixed-seed models built with transformers, adapters built with PEFT (the test oracle).

PEFT's ``init_lora_weights=False`` draws random A *and* B, so every adapter changes the model (a fresh PEFT init has
B = 0 and would make every equality test pass vacuously).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)


def tiny_config(arch: str, tie: bool | None = None):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=bool(tie))
    if arch == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=bool(tie))
    if arch == "gemma3":
        return Gemma3TextConfig(**TINY, head_dim=8, sliding_window=16,
                                tie_word_embeddings=True if tie is None else tie)
    if arch == "gpt2":
        return GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                          tie_word_embeddings=True if tie is None else tie)
    raise ValueError(arch)


def build_tiny_base(folder: Path, arch: str = "llama", *, dtype: torch.dtype = torch.float32,
                    tie: bool | None = None, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie)).to(dtype)
    model.save_pretrained(folder)
    return folder


def build_peft_adapter(folder: Path, base: Path, *, seed: int = 1, perturb_magnitude: bool = True,
                       resize_vocab_to: int | None = None, **lora_kwargs) -> Path:
    """A PEFT adapter with random A and B (and DoRA magnitudes nudged away from their init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if resize_vocab_to:
        model.resize_token_embeddings(resize_vocab_to)
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if perturb_magnitude and "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))  # a "trained" replacement differs from the base
    peft_model.save_pretrained(folder)
    return folder


def peft_merged_state(base: Path, adapter: Path, *, resize_vocab_to: int | None = None,
                      untie: bool = False) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload in float32. ``untie`` first unties the embeddings by hand, the only way PEFT 0.21 merges
    LoRA on a tied lm_head/embed_tokens correctly (see DESIGN.md)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"tie_word_embeddings": False} if untie else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kwargs)
    if untie:
        model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.clone())
    if resize_vocab_to:
        model.resize_token_embeddings(resize_vocab_to)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@torch.no_grad()
def peft_unmerged_logits(base: Path, adapter: Path, ids: torch.Tensor, *, resize_vocab_to: int | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if resize_vocab_to:
        model.resize_token_embeddings(resize_vocab_to)
    return PeftModel.from_pretrained(model, adapter).eval()(input_ids=ids).logits


@torch.no_grad()
def model_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()(input_ids=ids).logits.float()


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def run_export(base: Path, adapter: Path, out: Path, **plan_kwargs):
    from exporter.pipeline import ExportPlan, run_pipeline

    return run_pipeline(ExportPlan(base=str(base), adapter=str(adapter), out=out, progress=False, **plan_kwargs))


@pytest.fixture
def probe_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
