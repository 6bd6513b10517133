"""The token scores of a SentencePiece-style (byte-fallback BPE) tokenizer.json against gguf-py's own reader of that
file, LlamaHfVocab (what llama.cpp's convert_hf_to_gguf.py uses for it)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")

CORPUS = ["a cat sat on a mat", "the dog ate a bone"] * 20


def test_added_tokens_score_minus_1000_as_gguf_py_scores_them(tmp_path):
    """Added tokens (the special <unk>, <s>, </s> and two added later, one special and one not) are outside
    SentencePiece's merge ranking: gguf-py gives each the score -1000.0, and so must we (a high score would make
    llama.cpp's SPM tokenizer prefer them over real merges)."""
    from gguf.vocab import LlamaHfVocab
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from converters.gguf.vocab import load_vocab

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens(["<tool>"])
    fast.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    fast.save_pretrained(tmp_path)

    ours = load_vocab(tmp_path)
    theirs = {text: score for text, score, _ in LlamaHfVocab(tmp_path).all_tokens()}
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    added = {t["content"].encode(): t["id"] for t in tokenizer_json["added_tokens"]}
    assert set(added) == {b"<unk>", b"<s>", b"</s>", b"<tool>", b"<|end|>"}
    for text, token_id in added.items():
        assert ours.tokens[token_id] == text
        assert ours.scores[token_id] == theirs[text] == -1000.0, text
