"""The Ollama TEMPLATE we derive renders conversations exactly as the HF chat template does in transformers.

Every expected value comes from outside our code: Go's own text/template (what Ollama runs, compiled from a 15-line
program in conftest.py) renders our TEMPLATE, transformers' apply_chat_template renders the Jinja template, and the
text a template puts once before the first turn (the BOS string, which Ollama's runtime adds as a token rather than as
TEMPLATE text) is written down by hand for each template below, read off the template itself.
"""

from __future__ import annotations

import pytest

from converters.gguf.modelfile import modelfile

pytestmark = pytest.mark.filterwarnings("error")  # the Modelfile writer warns about nothing it should not

TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama3": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "gemma": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
             "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
             "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    # Drops system messages without a word (and starts with no fixed text): the TEMPLATE must drop them too.
    "chatml-no-system": "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
                        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # A block tag a line, indented, as many tokenizer_config.json files write it: renders right only with jinja's
    # trim_blocks and lstrip_blocks (the newline after a block tag and the spaces before it dropped), as transformers
    # renders templates.
    "chatml-a-tag-a-line": "{% for m in messages %}\n<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                           "  {% endfor %}\n  {% if add_generation_prompt %}\n<|im_start|>assistant\n  {% endif %}\n",
    "demo": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # Real models' templates, as their tokenizer_config.json carries them.
    "gemma-3-it": (
        "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
        "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
        "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
        "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
        "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
        "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
        "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
        "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
        "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"),
    "llama-3-instruct": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
        "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "mistral-small-24b-instruct-2501": (
        "{{- bos_token }}\n\n{%- for message in messages %}\n    {%- if message['role'] == 'user' %}\n"
        "        {{- '[INST]' + message['content'] + '[/INST]' }}\n    {%- elif message['role'] == 'system' %}\n"
        "        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}\n"
        "    {%- elif message['role'] == 'assistant' %}\n        {{- message['content'] + eos_token }}\n"
        "    {%- else %}\n        {{- raise_exception('Only user, system and assistant roles are supported!') }}\n"
        "    {%- endif %}\n{%- endfor %}"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from exporter.demo import build_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder, vocab_size=128)
    return AutoTokenizer.from_pretrained(folder)


BOS = "<s>"  # build_tokenizer's bos_token
# What each template renders once before the first turn, read off the template by hand: the TEMPLATE leaves it to the
# runtime, so Go's rendering must equal transformers' without exactly this text in front.
LEADING = {"chatml": "", "chatml-a-tag-a-line": "", "llama3": BOS, "gemma": BOS, "chatml-no-system": "", "demo": "", "gemma-3-it": BOS,
           "llama-3-instruct": BOS, "mistral-small-24b-instruct-2501": BOS}
# A template with fixed text before the first turn that is no BOS: the TEMPLATE cannot carry it, the Modelfile's
# notes must say so, and Go's rendering is transformers' without it.
PREAMBLE = "Transcript of a chat.\n"
PREAMBLE_TEMPLATE = (PREAMBLE + "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _go_template(tokenizer) -> str:
    """Our TEMPLATE text, taken from the Modelfile as users get it."""
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    text, _ = modelfile("m.gguf", tokenizer.chat_template, special, [])
    return text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


def _compare_with_transformers(go_render, tokenizer, leading: str) -> int:
    """Each conversation: transformers' rendering == ``leading`` + Go's rendering of our TEMPLATE. Returns how many
    conversations the template accepted."""
    template = _go_template(tokenizer)
    checked = 0
    for messages in CONVERSATIONS:
        try:
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            assert messages[0]["role"] == "system" and "no system" in str(e), messages
            continue  # the template itself refuses this conversation
        assert expected.startswith(leading), (expected, leading)
        assert go_render(template, messages) == expected[len(leading):], messages
        checked += 1
    return checked


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_go_template_renders_like_transformers(go_render, hf_tokenizer, name):
    assert hf_tokenizer.bos_token == BOS
    hf_tokenizer.chat_template = TEMPLATES[name]
    checked = _compare_with_transformers(go_render, hf_tokenizer, LEADING[name])
    assert checked == (2 if name == "gemma" else 3)  # the toy gemma template refuses system turns
    # A leading BOS is what the runtime adds anyway: nothing to note. Anything else must be noted.
    _, notes = modelfile("m.gguf", TEMPLATES[name], {"bos_token": BOS, "eos_token": "</s>"}, [])
    assert notes == []


def test_fixed_text_before_the_first_turn_is_noted_and_left_out(go_render, hf_tokenizer):
    hf_tokenizer.chat_template = PREAMBLE_TEMPLATE
    assert _compare_with_transformers(go_render, hf_tokenizer, PREAMBLE) == 3
    _, notes = modelfile("m.gguf", PREAMBLE_TEMPLATE, {"bos_token": BOS, "eos_token": "</s>"}, [])
    assert notes == [f"the chat template starts every conversation with {PREAMBLE!r}, which the Ollama TEMPLATE "
                     "leaves out"]


def test_modelfile_has_stops_from_turn_end_and_eos():
    text, notes = modelfile("model-Q8_0.gguf", TEMPLATES["chatml"], {"eos_token": "<|endoftext|>"}, ["<|endoftext|>"])
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-Q8_0.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert notes == []


def test_template_without_chat_template_is_noted():
    text, notes = modelfile("m.gguf", None, {}, ["</s>"])
    assert "TEMPLATE" not in text and notes and 'PARAMETER stop "</s>"' in text


def test_a_template_that_repeats_a_message_elsewhere_is_noted_not_written_with_placeholders():
    """An assistant turn echoed after its end ("(said: …)"): no fixed prefix and suffix reproduce that, so the
    Modelfile gets no TEMPLATE and a note, never a TEMPLATE or stop holding the derivation's placeholder text."""
    echo = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% if m['role'] == 'assistant' %}(said: {{ m['content'] }})\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    text, notes = modelfile("m.gguf", echo, {"eos_token": "<|endoftext|>"}, ["<|endoftext|>"])
    assert "\x01" not in text and "TEMPLATE" not in text
    assert any("outside its own turn" in note for note in notes), notes
