"""Fixtures: tiny fixed-seed models built with transformers, adapters built with PEFT (the test oracle).

PEFT's ``init_lora_weights=False`` draws random A *and* B, so every adapter changes the model (a fresh PEFT init has
B = 0 and would make every equality test pass vacuously).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
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
                    tie: bool | None = None, seed: int = 0, random_biases: bool = False, **save_kwargs) -> Path:
    """``random_biases``: transformers initialises biases to zero, which hides every bug in how a bias is treated."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie))
    if random_biases:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(folder, **save_kwargs)
    return folder


# The 64-wide llama the GGUF, one-pass and quantization tests start from: 16-row heads (llama.cpp's Q/K permutation
# moves rows), room for K-quant-free block types, and a tokenizer llama.cpp recognises (llama-bpe).
LLAMA_64 = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


def build_bf16_llama(folder: Path) -> Path:
    """A bf16 llama of LLAMA_64's shape (seed 0, untied head) with its tokenizer: a base as users have one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from exporter.demo import build_tokenizer

    build_tokenizer(folder, vocab_size=128, family="llama-bpe")
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_64, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
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


TRAIN_SEED, TRAIN_LENGTH = 3, 24


def train_adapter(folder: Path, base: Path, *, steps: int = 8, lr: float = 5e-3, dtype: torch.dtype = torch.bfloat16,
                  tokenizer: bool = False, **lora_kwargs) -> Path:
    """A PEFT adapter as users make one: default init (lora_B = 0), then a few AdamW steps of language modelling on the
    base loaded in ``dtype`` (PEFT keeps the adapter in float32), saved with save_pretrained. Every value in it comes
    from training, so its scale is realistic: a random adapter hides scale bugs, an untrained one hides everything.
    ``tokenizer``: train on the base folder's tokenizer applied to a few sentences, else on fixed random ids."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    if tokenizer:
        from transformers import AutoTokenizer

        from exporter.demo import _CORPUS

        tok = AutoTokenizer.from_pretrained(base)
        batch = [torch.tensor(tok(text)["input_ids"]) for text in _CORPUS]
    else:
        batch = [torch.randint(0, vocab, (TRAIN_LENGTH,), generator=gen) for _ in range(4)]
    torch.manual_seed(TRAIN_SEED)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(peft_model(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss for ids in batch) / len(batch)
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(folder)
    return folder


def peft_merged_state(base: Path, adapter: Path, *, resize_vocab_to: int | None = None,
                      untie: bool = False) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload in float32. ``untie`` first unties the embeddings by hand, the only way PEFT 0.21 merges
    LoRA on a tied lm_head/embed_tokens correctly (its merge_and_unload alters the tied end too, peft #2018)."""
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


def run_export(base: Path | None, adapter: Path, out: Path, **plan_kwargs):
    from exporter.context import ExportPlan
    from exporter.pipeline import run_pipeline

    return run_pipeline(ExportPlan(base=None if base is None else str(base), adapter=str(adapter), out=out,
                                   progress=False, **plan_kwargs))


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out independently of converters/gguf/arch.py."""
    head_rows = weights.shape[0] // n_head
    out = np.empty_like(weights)
    for h in range(n_head):
        block = weights[h * head_rows:(h + 1) * head_rows]
        half = head_rows // 2
        out[h * head_rows:(h + 1) * head_rows:2] = block[:half]  # row i of the first half -> row 2i
        out[h * head_rows + 1:(h + 1) * head_rows:2] = block[half:]  # row i of the second half -> row 2i + 1
    return out


def break_merge_scale(monkeypatch, scale_of) -> None:
    """Make the *merge* (never the reference) use ``scale_of(scale, rank)`` instead of each module's scale."""
    import exporter.stages.merge as merge_stage

    class WrongScale(merge_stage.LoraMerge):
        def __init__(self, weight, a, b, scale, **kw):
            super().__init__(weight, a, b, scale_of(scale, a.shape[0]), **kw)

    monkeypatch.setattr(merge_stage, "LoraMerge", WrongScale)


@pytest.fixture
def probe_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


GO_RENDERER = """
package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string; Content string }

func main() {
    var in struct { Template string; Messages []Message }
    if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
    t := template.Must(template.New("t").Parse(in.Template))
    if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil { panic(err) }
}
"""


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is needed for this oracle: scripts/test installs golang-go")
    folder = tmp_path_factory.mktemp("go")
    (folder / "main.go").write_text(GO_RENDERER)
    subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, cwd=folder,
                   env={"HOME": str(folder), "GOCACHE": str(folder / "cache"), "PATH": "/usr/bin:/bin"})

    def render(template: str, messages: list[dict[str, str]]) -> str:
        payload = json.dumps({"Template": template, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                                  for m in messages]})
        return subprocess.run([str(folder / "render")], input=payload, capture_output=True, text=True,
                              check=True).stdout

    return render



def assert_ollama_template_matches(go_render, tokenizer, conversations) -> int:
    """Our Ollama TEMPLATE, run by Go's text/template, renders each conversation as transformers'
    apply_chat_template does. Returns how many conversations were compared (a template may refuse system turns)."""
    from converters.gguf.modelfile import derive_chat_format, go_template

    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    fmt = derive_chat_format(tokenizer.chat_template, special)
    template = go_template(fmt)
    checked = 0
    for messages in conversations:
        try:
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            assert messages[0]["role"] == "system" and fmt.system is None, messages
            continue  # the template itself refuses this conversation
        assert fmt.leading + go_render(template, messages) == expected, messages
        checked += 1
    return checked


def ort_greedy(model: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding driven with ONNX Runtime's API alone (not the exporter's parity helpers): a prefill from an
    empty past, then one token at a time from the presents."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32 if i.type == "tensor(float)" else np.float16)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    ids, tokens = prompt, []
    for _ in range(steps):
        total = len(prompt) + len(tokens)
        out = dict(zip(names, session.run(None, {
            "input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(total - len(ids), total, dtype=np.int64)[None], **past})))
        tokens.append(int(out["logits"][0, -1].argmax()))
        past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        ids = [tokens[-1]]
    return tokens
