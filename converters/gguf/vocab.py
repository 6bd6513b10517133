"""Tokenizer → GGUF vocabulary: tokens, scores, token types, merges, special ids, add_bos/eos and the chat template.

Three tokenizer kinds, as llama.cpp distinguishes them:
  * SentencePiece (tokenizer.model)                       → tokenizer.ggml.model "llama", pre "default"
  * SentencePiece-style BPE in tokenizer.json (byte_fallback, ▁ for spaces: Gemma, Llama 2 fast tokenizers)
                                                          → "llama", scores from the vocabulary order
  * byte-level BPE in tokenizer.json (GPT-2, Llama 3, Qwen) → "gpt2" with merges and a named pre-tokenizer
The BPE pre-tokenizer is identified by the regex in tokenizer.json (robust to fine-tunes that change the vocabulary)
and, for real checkpoints, by llama.cpp's own fingerprint of a fixed probe text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf.constants import TokenType

from converters.errors import ConverterError
from converters.gguf.hf_encoding import LazyHFEncoder


class VocabError(ConverterError):
    """The tokenizer cannot be written as a GGUF vocabulary llama.cpp tokenizes identically."""


# Split regexes of the byte-level BPE pre-tokenizers llama.cpp implements, as they appear in tokenizer.json.
PRE_TOKENIZER_REGEXES: dict[str, str] = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
# llama.cpp's fingerprints: sha256 of str(tokenizer.encode(CHECK_TEXT)) for the reference checkpoints.
PRE_TOKENIZER_HASHES: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis "
    "concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told "
    "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = sorted(set(PRE_TOKENIZER_REGEXES) | set(PRE_TOKENIZER_HASHES.values()) | {"default"})


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    notes: list[str] = field(default_factory=list)

    def metadata_bytes(self) -> int:
        """An upper bound on what the vocabulary adds to a GGUF header: each token (a u64 length and its bytes), its
        type and score, each merge, the chat template(s), the special ids and flags."""
        merges = self.special.merges or []
        template = self.special.chat_template
        templates = [template] if isinstance(template, str) else [t.get("template", "") for t in template or []]
        return (sum(len(token) + 16 for token in self.tokens) + sum(len(m.encode()) + 8 for m in merges)
                + sum(len(t.encode()) + 64 for t in templates) + 4096)

    def pad_to(self, n_rows: int) -> None:
        """llama.cpp needs exactly one token per embedding row: fill unused rows with unique placeholders."""
        if len(self.tokens) > n_rows:
            raise VocabError(f"the tokenizer has {len(self.tokens)} tokens but the embedding only {n_rows} rows")
        for i in range(len(self.tokens), n_rows):
            self.tokens.append(f"[PAD{i}]".encode())
            self.types.append(TokenType.UNUSED)
            if self.scores is not None:
                self.scores.append(-1000.0)


# What gguf.SpecialVocab reads from tokenizer.json: special tokens, the post-processor (add BOS/EOS) and, when asked,
# the merges. The vocabulary itself (the bulk of the file: 262k entries for Gemma) it never uses.
_SPECIAL_VOCAB_KEYS = ("added_tokens", "post_processor")


def special_vocab(folder: Path, tokenizer_json: dict[str, Any] | None, n_vocab: int,
                  load_merges: bool = False) -> gguf.SpecialVocab:
    """gguf.SpecialVocab of the folder, handed a copy of tokenizer.json cut to what it reads when the file is already
    parsed (parsing Gemma's 33 MB tokenizer.json again costs 0.8 s)."""
    if tokenizer_json is None:
        return gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    import shutil
    import tempfile

    cut: dict[str, Any] = {key: tokenizer_json[key] for key in _SPECIAL_VOCAB_KEYS if key in tokenizer_json}
    if load_merges:
        cut["model"] = {"merges": (tokenizer_json.get("model") or {}).get("merges")}
    with tempfile.TemporaryDirectory(prefix="lora-export-vocab-") as tmp:
        # every file SpecialVocab reads besides tokenizer.json: the chat template included, which transformers
        # saves as chat_template.jinja (plus additional_chat_templates/) rather than in tokenizer_config.json
        for name in ("tokenizer_config.json", "config.json", "special_tokens_map.json", "merges.txt",
                     "chat_template.jinja", "chat_template.json"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, Path(tmp) / name)
        if (folder / "additional_chat_templates").is_dir():
            shutil.copytree(folder / "additional_chat_templates", Path(tmp) / "additional_chat_templates")
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(cut), encoding="utf-8")
        return gguf.SpecialVocab(tmp, load_merges=load_merges, n_vocab=n_vocab)


def _split_regexes(pre_tokenizer: dict[str, Any] | None) -> list[str]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [r for p in pre_tokenizer.get("pretokenizers", []) for r in _split_regexes(p)]
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return [pattern.get("Regex") or re.escape(pattern.get("String", ""))]
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return [PRE_TOKENIZER_REGEXES["gpt-2"]]
    return []


def identify_pre_tokenizer(tokenizer_json: dict[str, Any], encoder: LazyHFEncoder) -> str | None:
    regexes = _split_regexes(tokenizer_json.get("pre_tokenizer"))
    by_regex = {regex: name for name, regex in PRE_TOKENIZER_REGEXES.items()}
    if len(regexes) == 1 and regexes[0] in by_regex:
        return by_regex[regexes[0]]
    if (hf := encoder.get()) is None:  # a tokenizer transformers cannot load is not identifiable either
        return None
    # llama.cpp's fingerprint: transformers' encode(CHECK_TEXT), special tokens included
    return PRE_TOKENIZER_HASHES.get(hashlib.sha256(str(hf.encode(CHECK_TEXT, True)).encode()).hexdigest())


def _added_token_types(tokenizer_json: dict[str, Any]) -> dict[int, int]:
    return {t["id"]: TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED
            for t in tokenizer_json.get("added_tokens", [])}


def _byte_level_bpe(folder: Path, tokenizer_json: dict[str, Any], pre: str | None, encoder: LazyHFEncoder) -> Vocab:
    base = gguf.BpeVocab(folder)
    tokens = [t for t, _, _ in base.bpe_tokens()]
    added = _added_token_types(tokenizer_json)
    types = [TokenType.NORMAL] * len(tokens)
    for text in base.added_tokens_list:
        tokens.append(text.encode("utf-8"))
        types.append(TokenType.NORMAL)
    for token_id, kind in added.items():
        if token_id < len(types):
            types[token_id] = kind
    pre = pre or identify_pre_tokenizer(tokenizer_json, encoder)
    if pre is None:
        raise VocabError("the byte-level BPE pre-tokenizer in tokenizer.json is not one llama.cpp knows by name, so "
                         "llama.cpp would split text differently; pass --gguf-pre NAME with the family it follows "
                         f"(one of: {', '.join(KNOWN_PRE_TOKENIZERS)})")
    special = special_vocab(folder, tokenizer_json, len(tokens), load_merges=True)
    if not special.merges:
        raise VocabError("tokenizer.json has no merges; llama.cpp's BPE tokenizer needs them")
    return Vocab("gpt2", pre, tokens, types, None, special)


def _sentencepiece_style_bpe(folder: Path, tokenizer_json: dict[str, Any]) -> Vocab:
    model = tokenizer_json["model"]
    vocab: dict[str, int] = model["vocab"]
    added = _added_token_types(tokenizer_json)
    size = max([*vocab.values(), *added]) + 1
    tokens: list[bytes] = [b""] * size
    types = [TokenType.UNUSED] * size
    scores = [-1000.0] * size
    for text, token_id in vocab.items():
        tokens[token_id] = text.encode("utf-8")
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[token_id], scores[token_id] = TokenType.BYTE, 0.0
        else:
            # SentencePiece BPE ranks merges by score, and the vocabulary is stored in score order: -id keeps it.
            types[token_id], scores[token_id] = TokenType.NORMAL, -float(token_id)
    for t in tokenizer_json.get("added_tokens", []):
        tokens[t["id"]] = t["content"].encode("utf-8")
        types[t["id"]], scores[t["id"]] = added[t["id"]], -1000.0
    unk = model.get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = TokenType.UNKNOWN
    for i, token in enumerate(tokens):
        if not token:
            tokens[i] = f"[PAD{i}]".encode()
    normalizer = json.dumps(tokenizer_json.get("normalizer") or {})
    pre_tok = tokenizer_json.get("pre_tokenizer") or {}
    prepends = '"Prepend"' in normalizer or pre_tok.get("prepend_scheme") in ("first", "always")
    return Vocab("llama", "default", tokens, types, scores, special_vocab(folder, tokenizer_json, size),
                 add_space_prefix=prepends)


def _sentencepiece(folder: Path) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2

    base = gguf.SentencePieceVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in base.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    # The normalizer's flags change tokenization ("a  b" vs "a b", a leading "▁"); llama.cpp reads them from keys
    # that default to other values, so carry them over from the model itself.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    vocab = Vocab("llama", "default", tokens, types, scores, gguf.SpecialVocab(folder, n_vocab=len(tokens)),
                  add_space_prefix=proto.normalizer_spec.add_dummy_prefix)
    vocab.remove_extra_whitespaces = proto.normalizer_spec.remove_extra_whitespaces
    return vocab


def _hf_special_token_behaviour(encoder: LazyHFEncoder, special: gguf.SpecialVocab) -> None:
    """Write add_bos/add_eos as the HF tokenizer actually behaves. Left unset, llama.cpp guesses from the
    pre-tokenizer (llama-bpe and tekken force a BOS), and tokenization then differs from transformers."""
    if (hf := encoder.get()) is not None:
        special.add_special_token["bos"], special.add_special_token["eos"] = hf.adds_bos_eos()
    # else no tokenizer transformers can load: keep what tokenizer_config/tokenizer.json said


def load_vocab(folder: Path, pre_override: str | None = None, tokenizer_json: dict[str, Any] | None = None) -> Vocab:
    """Read the tokenizer in ``folder`` (tokenizer.model preferred, else tokenizer.json, or ``tokenizer_json``: that
    file already parsed by the caller)."""
    encoder = LazyHFEncoder(folder)
    try:
        vocab = _load_vocab(folder, pre_override, encoder, tokenizer_json)
        _hf_special_token_behaviour(encoder, vocab.special)
    except VocabError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # gguf-py or tokenizers on bad files
        raise VocabError(f"the tokenizer files cannot be read as a tokenizer ({type(e).__name__}: {e})") from e
    return vocab


def _load_vocab(folder: Path, pre_override: str | None, encoder: LazyHFEncoder,
                tokenizer_json: dict[str, Any] | None) -> Vocab:
    if pre_override is not None and pre_override not in KNOWN_PRE_TOKENIZERS:
        raise VocabError(f"pre-tokenizer '{pre_override}' is unknown; use one of {', '.join(KNOWN_PRE_TOKENIZERS)}")
    if (folder / "tokenizer.model").is_file():
        return _sentencepiece(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise VocabError("no tokenizer.model or tokenizer.json: a GGUF needs the tokenizer inside it")
    if tokenizer_json is None:
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_style_bpe(folder, tokenizer_json)
    decoder = (tokenizer_json.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and decoder == "ByteLevel":
        return _byte_level_bpe(folder, tokenizer_json, pre_override, encoder)
    raise VocabError(f"tokenizer.json uses a {model.get('type')} model with a {decoder} decoder, which lora-export "
                     "cannot convert for llama.cpp yet (supported: SentencePiece, byte-level BPE)")
