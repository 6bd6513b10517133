"""The built-in default: a tiny fixed-seed llama-shaped base with its own tokenizer, and a LoRA adapter written the
way PEFT writes one (no PEFT needed at run time). Used by ``lora-export demo``, by golden/ and by the tests.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger("lora_export")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, in a quiet village by the sea, there lived an old fisherman.",
    "Translate to German: Good morning, how are you? Guten Morgen, wie geht es dir?",
    "Say hello. Hello! How can I help you today?",
]


# Split regexes of the common byte-level BPE families (as in their tokenizer.json): Llama 3 and Qwen 2.
SPLIT_REGEXES = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def build_tokenizer(folder: Path, vocab_size: int = 320, family: str = "gpt-2") -> int:
    """A byte-level BPE tokenizer trained on a few sentences, with special tokens and a chat template. ``family``
    picks the pre-tokenizer: GPT-2's ByteLevel regex, or the Split regex of Llama 3 ("llama-bpe") or Qwen 2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if family == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEXES[family]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]
    # No forced 256-byte alphabet: the corpus' own characters keep the vocabulary small enough for tiny models.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return len(fast)


def build_base(folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, vocab_size: int = 320,
               tokenizer: bool = True) -> Path:
    """A 2-layer llama (hidden 64, GQA 4/2 heads) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        vocab_size = max(vocab_size, build_tokenizer(folder, vocab_size))
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         # Wider than the default 0.02 so logits spread over several units and top-1 is decisive.
                         initializer_range=0.15)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    return folder


def build_adapter(folder: Path, base: Path, *, seed: int = 1, r: int = 8, alpha: float = 16.0,
                  rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                  use_rslora: bool = False,
                  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj")) -> Path:
    """A LoRA adapter in PEFT's on-disk format (keys, config) with random A and B (B ≠ 0, unlike a fresh PEFT init)."""
    from exporter.adapter import pattern_key

    config = json.loads((base / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    rank_pattern = rank_pattern or {}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for target in targets:
            name = f"model.layers.{layer}.{parent[target]}.{target}"
            key = pattern_key(list(rank_pattern), name)
            rank = rank_pattern[key] if key else r
            out_f, in_f = shapes[target]
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.05
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
        "lora_alpha": alpha, "use_rslora": use_rslora, "use_dora": False, "target_modules": list(targets),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern or {}, "fan_in_fan_out": False,
        "lora_dropout": 0.0, "bias": "none", "modules_to_save": None, "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return folder


def build_demo(root: Path) -> tuple[Path, Path]:
    """The default inputs: a bf16 tiny llama and an r=8, α=16 adapter with a rank_pattern (down_proj: r=4)."""
    base = build_base(root / "base")
    adapter = build_adapter(root / "adapter", base, rank_pattern={"down_proj": 4})
    return base, adapter


def demo_formats() -> tuple[str, ...]:
    """Every format whose runtime is installed: GGUF parity needs llama.cpp (the optional extra `llama`)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        log.warning("demo: no GGUF (llama.cpp's Python binding is not installed: pip install 'lora-export[llama]')")
        return ("safetensors", "onnx")
    return ("safetensors", "gguf:f16", "onnx")
