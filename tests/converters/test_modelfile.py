"""The Ollama TEMPLATE we derive renders conversations exactly as the HF (Jinja) chat template does.

The oracle is Go's own text/template (what Ollama runs), compiled from a 15-line program in the test.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from converters.gguf.modelfile import _render, derive_chat_format, go_template, modelfile

GO_RENDERER = """
package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string; Content string }

func main() {
    var in struct { Template string; Messages []Message }
    if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
    t := template.Must(template.New("t").Parse(in.Template))
    if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil { panic(err) }
}
"""

TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama3": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "gemma": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
             "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
             "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    "demo": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}",
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is needed for this oracle: scripts/test installs golang-go")
    folder = tmp_path_factory.mktemp("go")
    (folder / "main.go").write_text(GO_RENDERER)
    subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, cwd=folder,
                   env={"HOME": str(folder), "GOCACHE": str(folder / "cache"), "PATH": "/usr/bin:/bin"})

    def render(template: str, messages: list[dict[str, str]]) -> str:
        payload = json.dumps({"Template": template, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                                  for m in messages]})
        return subprocess.run([str(folder / "render")], input=payload, capture_output=True, text=True,
                              check=True).stdout

    return render


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_go_template_renders_like_jinja(go_render, name):
    template = TEMPLATES[name]
    fmt = derive_chat_format(template, {"bos_token": "<s>"})
    go = go_template(fmt)
    for messages in CONVERSATIONS:
        if messages[0]["role"] == "system" and fmt.system is None:
            continue  # the template itself refuses system turns
        expected = _render(template, messages, {"bos_token": "<s>"}, generation=True)
        assert fmt.leading + go_render(go, messages) == expected, (name, messages)


def test_modelfile_has_stops_from_turn_end_and_eos():
    text, notes = modelfile("model-Q8_0.gguf", TEMPLATES["chatml"], {"eos_token": "<|endoftext|>"}, ["<|endoftext|>"])
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-Q8_0.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert notes == []


def test_template_without_chat_template_is_noted():
    text, notes = modelfile("m.gguf", None, {}, ["</s>"])
    assert "TEMPLATE" not in text and notes and 'PARAMETER stop "</s>"' in text
