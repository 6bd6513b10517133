"""Failure branches driven through the real CLI by a broken artifact or a bad input: each must end with the exit code
README.md promises, one line saying what went wrong, and nothing written at --out.

  * a GGUF whose vocabulary was corrupted after it was written (two token strings swapped in the file): llama.cpp
    tokenizes the probe texts differently from transformers, so parity fails (exit 3, the failed report names the
    tokenizer), although every logit still matches;
  * a bug (an unexpected exception in the middle of the export): exit 1, one "internal error" line, the traceback
    only with -v;
  * adapters a GGUF LoRA cannot express (modules_to_save, embedding LoRA, lora_bias), built by PEFT: exit 2 before
    anything is merged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import build_bf16_llama, build_peft_adapter, build_tiny_base
from exporter.cli import main


def cli(*args: str, verbose: bool = False):
    return CliRunner().invoke(main, [*(["-v"] if verbose else []), "run", *args, "--no-progress"])


def error_lines(output: str, prefix: str = "error:") -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefix)]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), "output was written"
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not left, f"left beside --out: {left}"  # no staging folder, no lock file


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> tuple[Path, Path]:
    """A bf16 llama with a llama-bpe tokenizer llama.cpp recognises, and a PEFT adapter on q_proj and v_proj."""
    root = tmp_path_factory.mktemp("failure-branches")
    base = build_bf16_llama(root / "base")
    adapter = build_peft_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, adapter


# -- a corrupted GGUF vocabulary -----------------------------------------------------------------------------------
def _tokens_to_swap(base: Path) -> tuple[int, int]:
    """Two ordinary tokens of the first probe text whose strings have the same length in UTF-8 (so they can trade
    places inside the file without moving a byte of anything else)."""
    from transformers import AutoTokenizer

    from exporter.parity.probes import PROBE_TEXTS

    tok = AutoTokenizer.from_pretrained(base)
    ids = [i for i in dict.fromkeys(tok(PROBE_TEXTS[0])["input_ids"]) if i not in tok.all_special_ids]
    length = {i: len(tok.convert_ids_to_tokens(i).encode("utf-8")) for i in ids}
    return next((a, b) for n, a in enumerate(ids) for b in ids[n + 1:] if length[a] == length[b])


def swap_token_strings(gguf_path: Path, a: int, b: int) -> None:
    """Swap the strings of tokens a and b in tokenizer.ggml.tokens, in place in the file's bytes."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path, "r+")
    field = reader.fields["tokenizer.ggml.tokens"]
    text_a, text_b = field.parts[field.data[a]], field.parts[field.data[b]]
    assert len(text_a) == len(text_b)
    saved = text_a.copy()
    text_a[:] = text_b
    text_b[:] = saved
    reader.data.flush()
    del reader


def test_a_gguf_whose_vocabulary_is_corrupted_fails_the_tokenizer_check(bf16_llama, tmp_path, monkeypatch):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from converters.gguf.writer import GGUFStreamWriter
    from exporter.parity.probes import probe_texts

    base, adapter = bf16_llama
    a, b = _tokens_to_swap(base)
    written_close = GGUFStreamWriter.close
    corrupted: list[tuple[str, str]] = []

    def close_then_corrupt(self):
        result = written_close(self)
        swap_token_strings(self.target, a, b)  # the file as it lies in the staging folder, before parity
        tokens = GGUFReader(self.target).fields["tokenizer.ggml.tokens"]
        corrupted.append((tokens.contents(a), tokens.contents(b)))
        return result

    monkeypatch.setattr(GGUFStreamWriter, "close", close_then_corrupt)
    out = tmp_path / "out"
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--to", "gguf:f32")

    tok = AutoTokenizer.from_pretrained(base)
    assert corrupted == [(tok.convert_ids_to_tokens(b), tok.convert_ids_to_tokens(a))]  # the swap is in the file
    assert result.exit_code == 3, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "parity failed for gguf (tokenizer differs on" in lines[0] and "Fix:" in lines[0], \
        result.output
    assert_nothing_written(out)
    # The oracle: transformers' own ids. Exactly the texts holding either swapped token must come out differently
    # (llama.cpp finds the string of one where the other's id should be).
    texts = probe_texts(tok)
    expected = [text[:40] for text in texts if {a, b} & set(tok(text, add_special_tokens=True)["input_ids"])]
    assert expected
    parity = json.loads((tmp_path / "out.failed-report.json").read_text())["artifacts"][0]["parity"]
    assert parity["tokenizer"] == {"texts": len(texts), "mismatched": expected}
    assert parity["passed"] is False
    assert parity["failures"] == f"tokenizer differs on {len(expected)} of {len(texts)} texts"  # the only failure
    assert parity["max_abs"] <= parity["thresholds"]["max_abs"]  # the weights are right: only the vocabulary broke


# -- an internal error ---------------------------------------------------------------------------------------------
FAULT = "injected fault: the merge's row blocks are gone"


def test_a_failure_mid_export_is_reported_as_itself_whatever_formats_were_open(bf16_llama, tmp_path, monkeypatch):
    """Every format asked for, and the merge fails on its first tensor: each sink is aborted before it wrote a byte
    (gguf-lora has no file yet), none of them may fail in turn and hide the error that stopped the run."""
    import exporter.stages.merge as merge_stage

    def broken_merge(*args, **kwargs):
        raise RuntimeError(FAULT)

    monkeypatch.setattr(merge_stage, "LoraMerge", broken_merge)
    base, adapter = bf16_llama
    out = tmp_path / "out"
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--to",
                 "safetensors,safetensors:nf4,gguf:q8_0,gguf-lora,onnx")
    assert result.exit_code == 1, result.output
    lines = error_lines(result.output, "internal error:")
    assert len(lines) == 1 and f"RuntimeError: {FAULT}" in lines[0], result.output
    assert_nothing_written(out)


def test_an_unexpected_exception_is_an_internal_error_with_the_traceback_under_v(bf16_llama, tmp_path, monkeypatch):
    """A bug mid-export (the merge raising what no input check can cause): exit 1, one line saying so, the staging
    folder removed; -v adds the traceback."""
    import exporter.stages.merge as merge_stage

    def broken_merge(*args, **kwargs):
        raise RuntimeError(FAULT)

    monkeypatch.setattr(merge_stage, "LoraMerge", broken_merge)
    base, adapter = bf16_llama
    out = tmp_path / "out"
    args = ("--base", str(base), "--adapter", str(adapter), "--out", str(out))

    plain = cli(*args)
    assert plain.exit_code == 1, plain.output
    lines = error_lines(plain.output, "internal error:")
    assert len(lines) == 1 and f"RuntimeError: {FAULT}" in lines[0] and "-v" in lines[0], plain.output
    assert not error_lines(plain.output)  # not dressed up as bad input
    assert "Traceback" not in plain.output
    assert_nothing_written(out)

    verbose = cli(*args, verbose=True)
    assert verbose.exit_code == 1, verbose.output
    assert len(error_lines(verbose.output, "internal error:")) == 1, verbose.output
    assert "Traceback (most recent call last)" in verbose.output
    assert f"RuntimeError: {FAULT}" in verbose.output.split("Traceback (most recent call last)", 1)[1]
    assert "broken_merge" in verbose.output  # the traceback reaches the frame that raised
    assert_nothing_written(out)


# -- adapters a GGUF LoRA cannot express ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_qwen2(tmp_path_factory) -> Path:
    """A bf16 Qwen2 with its tokenizer: its q/k/v projections have biases, which lora_bias needs (on a layer without
    one PEFT itself cannot merge it, and the load stage refuses the pair as not fitting)."""
    import torch

    from exporter.demo import build_tokenizer

    base = tmp_path_factory.mktemp("qwen2") / "base"
    build_tokenizer(base, vocab_size=128, family="qwen2")
    return build_tiny_base(base, "qwen2", dtype=torch.bfloat16, random_biases=True)


GGUF_LORA_REFUSALS = {  # the case: (its base, PEFT's LoraConfig arguments, what the error must name)
    "modules_to_save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        "modules_to_save (lm_head.weight)"),
    "embedding LoRA": ("llama", dict(target_modules=["embed_tokens", "q_proj"]), "embedding LoRA"),
    "lora_bias": ("qwen2", dict(target_modules=["q_proj"], lora_bias=True), "lora_bias"),
}


@pytest.mark.parametrize("case", list(GGUF_LORA_REFUSALS))
def test_gguf_lora_refuses_what_it_cannot_express_before_the_merge(request, tmp_path, monkeypatch, case):
    import exporter.stages.export as export_stage
    import exporter.stages.merge as merge_stage

    def refuse(*args, **kwargs):
        raise AssertionError("the merge or the export started before the pre-flight refusal")

    monkeypatch.setattr(merge_stage, "LoraMerge", refuse)
    monkeypatch.setattr(merge_stage.MergeStage, "run", refuse)
    monkeypatch.setattr(export_stage.ExportStage, "run", refuse)
    arch, lora_kwargs, named = GGUF_LORA_REFUSALS[case]
    base = request.getfixturevalue("bf16_llama")[0] if arch == "llama" else request.getfixturevalue("bf16_qwen2")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, **lora_kwargs)
    out = tmp_path / "out"
    result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--to", "gguf-lora")
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {adapter}: uses {named}, which a GGUF LoRA cannot express."), lines[0]
    assert "Fix: export the merged model instead: --to gguf." in lines[0]
    others = [text for _, _, text in GGUF_LORA_REFUSALS.values() if text != named]
    assert not [text for text in others if text in lines[0]], lines[0]  # it names this adapter's problem only
    assert_nothing_written(out)


def test_gguf_lora_refuses_a_module_llama_cpps_graph_has_no_tensor_for(tmp_path):
    """Gemma 2 in llama.cpp has no output tensor (the head is always the token embedding): a LoRA on lm_head cannot be
    applied there, so gguf-lora refuses it by name before the merge instead of writing an adapter llama.cpp drops; and
    a hyperparameter llama.cpp would not honour (query_pre_attn_scalar) is refused as for --to gguf."""
    import torch

    from exporter.demo import build_tokenizer

    from transformers import AutoModelForCausalLM

    from transformers import Gemma2Config

    from conftest import TINY

    base = tmp_path / "base"
    build_tokenizer(base, vocab_size=128)
    config = Gemma2Config(**TINY, head_dim=8, sliding_window=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    for scalar, words in ((256, "query_pre_attn_scalar=256, but llama.cpp scales attention by 8"),
                          (8, "'lm_head.weight' cannot carry a LoRA in llama.cpp's")):
        config.query_pre_attn_scalar = scalar  # transformers' default (256) is not this tiny shape's head_dim
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base)
        adapter = build_peft_adapter(tmp_path / f"adapter{scalar}", base, r=4, lora_alpha=8,
                                     target_modules=["q_proj", "lm_head"])
        out = tmp_path / "out"
        result = cli("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--to", "gguf-lora")
        assert result.exit_code == 2, result.output
        lines = error_lines(result.output)
        assert len(lines) == 1 and words in lines[0] and "Fix: export the merged model instead." in lines[0], \
            result.output
        assert_nothing_written(out)
