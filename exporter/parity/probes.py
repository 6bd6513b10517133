"""Parity's probes: short texts through the output's tokenizer (plus a chat turn rendered by its own template), random
token ids over the whole vocabulary, and the rows a resized vocabulary added."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PROBE_TEXTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a quiet village by the sea,",
    "Translate to German: Good morning, how are you?",
)
RANDOM_SEQUENCES, RANDOM_LENGTH, PROBE_SEED = 2, 24, 0


@dataclass(frozen=True)
class Probes:
    inputs: list[torch.Tensor]
    is_text: list[bool]  # tokenized text (in distribution) or random ids (out of distribution)


def probe_texts(tok: Any) -> list[str]:
    """The fixed texts, plus one chat turn rendered by the model's own template when it has one."""
    texts = list(PROBE_TEXTS)
    if getattr(tok, "chat_template", None):
        texts.append(tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                             add_generation_prompt=True))
    return texts


def probe_inputs(tok: Any | None, vocab_size: int, base_vocab: int) -> Probes:
    """Probe ids: the texts through ``tok`` (a transformers tokenizer, or None), then random ids."""
    inputs: list[torch.Tensor] = []
    if tok is not None:
        # add_special_tokens=False for the rendered chat turn: the template already wrote its own BOS.
        inputs += [torch.tensor(tok(text, add_special_tokens=i < len(PROBE_TEXTS))["input_ids"])
                   for i, text in enumerate(probe_texts(tok))]
    n_text = len(inputs)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    for _ in range(RANDOM_SEQUENCES):
        inputs.append(torch.randint(0, vocab_size, (RANDOM_LENGTH,), generator=gen))
    if vocab_size > base_vocab:  # the rows a resized vocabulary added must be checked too
        added = torch.arange(base_vocab, vocab_size)
        inputs.append(added[torch.randint(0, len(added), (RANDOM_LENGTH,), generator=gen)])
    kinds = [i < n_text for i in range(len(inputs))]
    keep = [i for i, p in enumerate(inputs) if p.numel() > 0]
    return Probes([inputs[i] for i in keep], [kinds[i] for i in keep])
