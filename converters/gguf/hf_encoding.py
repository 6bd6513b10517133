"""How transformers encodes text with a folder's tokenizer, which the GGUF must reproduce: whether it adds BOS / EOS,
and the ids llama.cpp fingerprints pre-tokenizers by.

Importing transformers and loading a tokenizer takes ~4 s, more than converting a small model. For the tokenizer
classes where transformers 5 encodes exactly as tokenizer.json says (its post-processor decides BOS/EOS, whatever
add_bos_token / add_eos_token tokenizer_config.json sets), the tokenizers library, transformers' own backend, runs the
file instead. tests/converters/test_gguf_vocab.py checks that against transformers for each of these classes, every
flag and several post-processors, byte-level and SentencePiece-style. Other classes are asked of transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_DERIVED_CLASSES = frozenset({
    "TokenizersBackend", "PreTrainedTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast", "GemmaTokenizer",
    "GemmaTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast",
})


@dataclass(frozen=True)
class HFEncoder:
    # (text, add_special_tokens) -> ids. From the files, they equal transformers' for byte-level BPE; for
    # SentencePiece-style tokenizers transformers' Llama/Gemma classes rebuild the pipeline their own way (unknown
    # pieces are fused, for one), so there only the special tokens added around the text are known to agree.
    encode: Callable[[str, bool], list[int]]
    bos_id: int | None
    eos_id: int | None

    def adds_bos_eos(self) -> tuple[bool, bool]:
        """Whether encoding with special tokens puts BOS before / EOS after the plain ids of the same text."""
        plain, full = self.encode("a", False), self.encode("a", True)
        if not plain or len(full) < len(plain):
            return False, False
        start = full.index(plain[0]) if plain[0] in full else 0
        return start > 0 and full[0] == self.bos_id, len(full) > start + len(plain) and full[-1] == self.eos_id


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def file_encoder(folder: Path) -> HFEncoder | None:
    """tokenizer.json run by the tokenizers library; None for a tokenizer class this is not known to equal
    transformers for, or without a tokenizer.json."""
    config_path, tokenizer_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if not tokenizer_path.is_file() or config.get("tokenizer_class") not in FILE_DERIVED_CLASSES:
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    return HFEncoder(lambda text, special: tokenizer.encode(text, add_special_tokens=special).ids,
                     tokenizer.token_to_id(bos) if bos else None, tokenizer.token_to_id(eos) if eos else None)


def transformers_encoder(folder: Path) -> HFEncoder | None:
    """transformers' own tokenizer (never with remote code); None when it cannot load one."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception:  # a tokenizer transformers cannot load has no behaviour to reproduce
        return None
    return HFEncoder(lambda text, special: tok(text, add_special_tokens=special)["input_ids"],
                     tok.bos_token_id, tok.eos_token_id)


class LazyHFEncoder:
    """The folder's encoder, loaded on first use and then shared (one conversion may need it twice)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._tried = False
        self._encoder: HFEncoder | None = None

    def get(self) -> HFEncoder | None:
        if not self._tried:
            self._encoder = file_encoder(self.folder) or transformers_encoder(self.folder)
            self._tried = True
        return self._encoder
