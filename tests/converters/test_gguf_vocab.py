"""Encoding read from the tokenizer files (converters/gguf/hf_encoding.py) equals what transformers actually does: the
add_bos/add_eos behaviour for every tokenizer class the file rule is trusted with, byte-level and SentencePiece-style
tokenizer.json, every combination of tokenizer_config flags and post-processors; and the ids of llama.cpp's
pre-tokenizer fingerprint text."""

from __future__ import annotations

import functools
import itertools
import json

import pytest

from converters.gguf.hf_encoding import FILE_DERIVED_CLASSES, file_encoder
from converters.gguf.vocab import CHECK_TEXT
from exporter.demo import build_tokenizer

POST_PROCESSORS = ["none", "bos", "bos+eos", "eos", "byte-level", "byte-level then bos"]
FLAGS = [{}, {"add_bos_token": True}, {"add_bos_token": False}, {"add_eos_token": True},
         {"add_bos_token": True, "add_eos_token": True}]
BASE_CLASSES = sorted(c for c in FILE_DERIVED_CLASSES if not c.endswith("Fast") or c == "PreTrainedTokenizerFast")
CORPUS = ["a cat sat on a mat", "the dog ate a bone"] * 20


@functools.cache
def trained_tokenizer_json(kind: str) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<s>", "</s>", "<pad>"]
    else:  # Llama 2 / Gemma: byte-fallback BPE over "▁"-joined words, with an unknown token
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    return json.loads(tok.to_str())


def cases(classes) -> list[tuple[str, str]]:
    # Gemma's tokenizer class needs an unknown token, which byte-level BPE vocabularies do not have.
    return [(kind, c) for kind in ("byte-level", "sentencepiece-style") for c in sorted(classes)
            if not (kind == "byte-level" and c.startswith("Gemma"))]


def post_processor(kind: str, tokenizer_json: dict):
    from tokenizers import processors

    ids = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    specials = [("<s>", ids["<s>"]), ("</s>", ids["</s>"])]
    template = {"bos": "<s> $A", "bos+eos": "<s> $A </s>", "eos": "$A </s>"}
    if kind in template:
        return processors.TemplateProcessing(single=template[kind], special_tokens=specials)
    if kind == "byte-level":
        return processors.ByteLevel(trim_offsets=False)
    if kind == "byte-level then bos":
        return processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                    processors.TemplateProcessing(single="<s> $A", special_tokens=specials)])
    return None


def write_tokenizer(folder, tokenizer_json: dict, post: str, flags: dict, tokenizer_class: str) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    if (processor := post_processor(post, tokenizer_json)) is not None:
        tok.post_processor = processor
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", **flags}))


def bos_eos_from_files(folder) -> tuple[bool, bool] | None:
    encoder = file_encoder(folder)
    return None if encoder is None else encoder.adds_bos_eos()


def transformers_behaviour(folder) -> tuple[bool, bool]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    plain = tok("a cat", add_special_tokens=False)["input_ids"]
    full = tok("a cat", add_special_tokens=True)["input_ids"]
    return full[:1] == [tok.bos_token_id] != plain[:1], full[-1:] == [tok.eos_token_id] != plain[-1:]


@pytest.mark.parametrize("kind, tokenizer_class", cases(BASE_CLASSES))
def test_file_rule_matches_transformers(tmp_path, kind, tokenizer_class):
    mismatches = []
    for i, (post, flags) in enumerate(itertools.product(POST_PROCESSORS, FLAGS)):
        folder = tmp_path / str(i)
        write_tokenizer(folder, trained_tokenizer_json(kind), post, flags, tokenizer_class)
        ours, actual = bos_eos_from_files(folder), transformers_behaviour(folder)
        if ours != actual:
            mismatches.append((post, flags, ours, actual))
    assert not mismatches


@pytest.mark.parametrize("kind, tokenizer_class", cases(FILE_DERIVED_CLASSES - set(BASE_CLASSES)))
def test_fast_aliases_match_transformers(tmp_path, kind, tokenizer_class):
    for i, (post, flags) in enumerate([("bos", {}), ("none", {}), ("bos+eos", {"add_bos_token": True})]):
        write_tokenizer(tmp_path / str(i), trained_tokenizer_json(kind), post, flags, tokenizer_class)
        assert bos_eos_from_files(tmp_path / str(i)) == transformers_behaviour(tmp_path / str(i)), (post, flags)


def test_other_classes_and_missing_tokenizer_json_are_left_to_transformers(tmp_path):
    write_tokenizer(tmp_path / "bert", trained_tokenizer_json("byte-level"), "bos", {}, "BertTokenizer")
    assert bos_eos_from_files(tmp_path / "bert") is None
    write_tokenizer(tmp_path / "no-json", trained_tokenizer_json("byte-level"), "bos", {}, "LlamaTokenizer")
    (tmp_path / "no-json" / "tokenizer.json").unlink()
    assert bos_eos_from_files(tmp_path / "no-json") is None


@pytest.mark.parametrize("family", ["gpt-2", "llama-bpe", "qwen2"])
@pytest.mark.parametrize("special", [True, False])
def test_fingerprint_text_encodes_like_transformers(tmp_path, family, special):
    # The fingerprint identifies byte-level BPE pre-tokenizers: the only tokenizers it is taken of.
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path, vocab_size=200, family=family)
    expected = AutoTokenizer.from_pretrained(tmp_path)(CHECK_TEXT, add_special_tokens=special)["input_ids"]
    assert file_encoder(tmp_path).encode(CHECK_TEXT, special) == expected


def test_padding_rows_are_what_llama_cpps_converter_writes():
    """convert_hf_to_gguf.py fills embedding rows the tokenizer lacks with "[PAD<id>]", type UNUSED and, in a scored
    (SentencePiece) vocabulary, score -1000.0: tokens no text ever produces."""
    from gguf.constants import TokenType

    from converters.gguf.vocab import Vocab

    vocab = Vocab(model="llama", pre="default", tokens=[b"<unk>", b"a"], types=[TokenType.UNKNOWN, TokenType.NORMAL],
                  scores=[0.0, -1.5], special=None)
    vocab.pad_to(4)
    assert vocab.tokens == [b"<unk>", b"a", b"[PAD2]", b"[PAD3]"]
    assert vocab.types[2:] == [TokenType.UNUSED] * 2 and vocab.scores == [0.0, -1.5, -1000.0, -1000.0]


@pytest.mark.parametrize("family", ["gpt-2", "llama-bpe"])
def test_the_vocabularys_size_bound_holds_what_gguf_py_writes_closely(tmp_path, family):
    """Vocab.metadata_bytes (the disk pre-flight's figure for the vocabulary) against the bytes gguf-py writes for
    it, the tokenizer keys added as converters/gguf/writer.py adds them: never under, and no more than its fixed
    allowances over, with hundreds of merges and tokens and a chat template so each term counts."""
    import gguf

    from converters.gguf.vocab import load_vocab

    build_tokenizer(tmp_path / "tok", vocab_size=640, family=family)
    vocab = load_vocab(tmp_path / "tok")
    assert len(vocab.special.merges) > 150 and vocab.special.chat_template
    # a real vocabulary has ~10^5 merges; a few hundred more (as the file would list them) make their term outweigh
    # the fixed allowance, so a merge counted short cannot hide in it
    vocab.special.merges = [*vocab.special.merges, *(f"x{i} y{i}" for i in range(400))]

    def header_bytes(with_vocab: bool) -> int:
        path = tmp_path / f"{with_vocab}.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        if with_vocab:
            writer.add_tokenizer_model(vocab.model)
            writer.add_tokenizer_pre(vocab.pre)
            writer.add_token_list(vocab.tokens)
            writer.add_token_types(vocab.types)
            if vocab.scores is not None:
                writer.add_token_scores(vocab.scores)
            vocab.special.add_to_gguf(writer, quiet=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return path.stat().st_size

    written = header_bytes(True) - header_bytes(False)
    templates = 1 if isinstance(vocab.special.chat_template, str) else len(vocab.special.chat_template)
    slack = 4096 + 64 * templates + 4 * len(vocab.tokens)  # allowances, and a score's 4 bytes an unscored BPE lacks
    assert written <= vocab.metadata_bytes() <= written + slack, (vocab.metadata_bytes(), written)
