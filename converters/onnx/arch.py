"""Architecture facts for HF -> ONNX, as data: which model types are tested end to end, what onnxruntime-genai calls
them, and the I/O names the graph uses (optimum's names, which onnxruntime-genai reads from genai_config.json).

Model types missing here are still tried (``OnnxWriter`` traces whatever transformers builds); they get no
genai_config.json, because onnxruntime-genai only runs the model types it knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch


@dataclass(frozen=True)
class ArchSpec:
    genai_type: str  # onnxruntime-genai 0.18's `model.type`
    note: str = ""


# Every entry is exported, run in ONNX Runtime and compared with transformers in tests/converters/test_onnx.py.
ARCHITECTURES: MappingProxyType[str, ArchSpec] = MappingProxyType({
    "llama": ArchSpec("llama"),
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3"),
    "phi3": ArchSpec("phi3", "fused qkv_proj and gate_up_proj are split inside the graph"),
    "gemma2": ArchSpec("gemma2", "sliding-window layers keep a full KV cache; the mask applies the window"),
    "gemma3_text": ArchSpec("gemma3_text", "sliding-window layers keep a full KV cache; the mask applies the window"),
})

# Model types whose refusal we know in advance, with the reason (anything else is tried).
REFUSED: MappingProxyType[str, str] = MappingProxyType({
    "gemma3": "a multimodal Gemma3ForConditionalGeneration config; export its text model (model_type gemma3_text, "
              "Gemma3ForCausalLM) instead",
})

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"

DTYPES = MappingProxyType({"fp32": torch.float32, "fp16": torch.float16})  # the graph's dtype: weights and compute
REFUSED_DTYPES = MappingProxyType({
    "bf16": "ONNX Runtime's CPU provider has no bf16 kernels for these graphs (MatMul, Softmax...); export fp16 or "
            "fp32 (weights are cast once while they are written)",
})
