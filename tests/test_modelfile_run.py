"""The Ollama Modelfile a real `lora-export run --to gguf` writes, read back as Ollama reads it and checked against
the model's own tokenizer and chat template.

The base is what users have: a bf16 llama whose tokenizer has ChatML's turn markers as added special tokens, an EOS
("</s>") that is not the end-of-turn marker, a generation_config.json listing both as EOS ids, and a ChatML chat
template. The oracles are outside our code: transformers' tokenizer (eos_token, decode of generation_config's ids,
apply_chat_template), the files themselves (tokenizer_config.json, generation_config.json), Go's text/template (what
Ollama runs the TEMPLATE with; conftest's go_render) and llama.cpp's tokenizer on the GGUF the Modelfile names.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import LLAMA_64, train_adapter

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATIONS = [  # two turns each, then the generation prompt
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(the base folder, the --out folder of `run --to gguf`) with default flags otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

    from exporter.cli import main
    from exporter.demo import build_tokenizer

    root = tmp_path_factory.mktemp("modelfile-run")
    base = root / "base"
    build_tokenizer(base, vocab_size=120, family="llama-bpe")  # ids 0-4: <s> </s> <pad> <|user|> <|assistant|>
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(base)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert len(tok) <= LLAMA_64["vocab_size"] and tok.eos_token == "</s>"
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base)
    # As instruct models ship it: generation stops at the end of a turn as well as at EOS.
    GenerationConfig(bos_token_id=0, eos_token_id=[1, im_end], pad_token_id=2).save_pretrained(base)
    adapter = train_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = root / "out"
    result = CliRunner().invoke(main, ["-q", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                                       "--to", "gguf", "--no-progress"])
    assert result.exit_code == 0, result.output
    return base, out


def parse_modelfile(text: str) -> tuple[str, str | None, list[str]]:
    """(FROM, TEMPLATE, the stop parameters) as Ollama's parser reads them: commands at the start of a line, a
    triple-quoted value may span lines. Anything else in the file fails the parse."""
    commands = re.compile(r'(FROM) (\S+)\n|(TEMPLATE) """(.*?)"""\n|(PARAMETER) stop "([^"\n]*)"\n', re.S)
    source, template, stops, at = None, None, [], 0
    while at < len(text):
        match = commands.match(text, at)
        assert match, f"unparsed Modelfile text: {text[at:at + 80]!r}"
        if match[1]:
            assert source is None, "two FROM lines"
            source = match[2]
        elif match[3]:
            assert template is None, "two TEMPLATE blocks"
            template = match[4]
        else:
            stops.append(match[6])
        at = match.end()
    assert source is not None, "no FROM line"
    return source, template, stops


@pytest.fixture(scope="module")
def modelfile(exported) -> tuple[Path, str | None, list[str]]:
    _, out = exported
    source, template, stops = parse_modelfile((out / "Modelfile").read_text())
    return out / source, template, stops


def test_from_names_the_gguf_written_beside_it(exported, modelfile):
    _, out = exported
    gguf, _, _ = modelfile
    assert gguf.resolve().parent == out.resolve() and gguf.is_file()
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in out.glob("*.gguf")) == [gguf.name]


def test_stops_are_the_tokenizers_end_of_turn_and_eos_strings(exported, modelfile):
    from transformers import AutoTokenizer

    base, _ = exported
    _, _, stops = modelfile
    tok = AutoTokenizer.from_pretrained(base)
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    gen_eos = json.loads((base / "generation_config.json").read_text())["eos_token_id"]
    eos_strings = {tok.eos_token, tok_config["eos_token"]} | {tok.decode([i]) for i in gen_eos}
    assert eos_strings == {"</s>", "<|im_end|>"}  # the fixture is what it says
    # The end of an assistant turn, as transformers renders the template: what must stop generation.
    rendered = tok.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": "MARK"}],
                                       tokenize=False)
    end_of_turn = rendered.split("MARK", 1)[1].strip()
    assert len(stops) == len(set(stops))
    assert set(stops) <= eos_strings, stops  # nothing that is not an end of generation
    assert {end_of_turn, tok.eos_token} <= set(stops), stops


@pytest.mark.skipif(shutil.which("go") is None, reason="Go's text/template is the oracle (scripts/test installs it)")
def test_template_rendered_by_go_equals_apply_chat_template(exported, modelfile, go_render):
    import llama_cpp
    from transformers import AutoTokenizer

    base, _ = exported
    gguf, template, _ = modelfile
    assert template is not None
    tok = AutoTokenizer.from_pretrained(base)
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for messages in CONVERSATIONS:
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = go_render(template, messages)
        assert prompt == expected, messages
        # What Ollama then feeds the model: the GGUF's tokenizer with its own BOS rule, as transformers tokenizes
        # the rendered chat (the template has no BOS of its own, and this tokenizer adds none).
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == list(ids), messages
