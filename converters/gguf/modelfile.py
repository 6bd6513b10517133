"""Ollama Modelfile for a GGUF: FROM, a TEMPLATE equivalent to the HF chat template, stop parameters.

The Go TEMPLATE is derived by rendering the Jinja chat template with sentinel messages and cutting the result at the
sentinels: what surrounds each role's content becomes that role's prefix and suffix. This works for every template
that wraps each message independently (ChatML, Llama 3, Gemma, Phi-3, Mistral-style, …); a template that does more
(tools, reasoning blocks, role checks) is reported and gets only the parts that could be derived.
"""

from __future__ import annotations

from dataclasses import dataclass

_SENTINEL = {"system": "\x01SYSTEM\x01", "user": "\x01USER\x01", "assistant": "\x01ASSISTANT\x01"}


@dataclass(frozen=True)
class ChatFormat:
    system: tuple[str, str] | None  # (prefix, suffix), or None when the template refuses a system message
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation_prompt: str
    leading: str  # text the template puts once at the start (e.g. a BOS string), left to the runtime
    # Templates without a system turn of their own (Gemma's) fold the system message into the first user turn, right
    # after the user prefix and followed by this separator; None when the system turn is a turn (or refused).
    system_in_first_user: str | None = None


def _render(template: str, messages: list[dict[str, str]], special: dict[str, str], generation: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=generation, **special)


def _between(text: str, left: str, right: str) -> str:
    return text.split(left, 1)[1].split(right, 1)[0]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"the template's {what} depends on the conversation around it")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if suffix and not text.endswith(suffix):
        raise ValueError(f"the template's {what} depends on the conversation around it")
    return text[: len(text) - len(suffix)] if suffix else text


def derive_chat_format(template: str, special_tokens: dict[str, str]) -> ChatFormat:
    """Render small conversations with sentinel contents and solve for each role's prefix and suffix:
         [u] → L Up U Us        [u] + generation prompt → L Up U Us G
         [u, a] → L Up U Us Ap A As        [u, a, u] → L Up U Us Ap A As Up U Us
    """
    u, a, sy = _SENTINEL["user"], _SENTINEL["assistant"], _SENTINEL["system"]
    user, assistant = {"role": "user", "content": u}, {"role": "assistant", "content": a}
    one = _render(template, [user], special_tokens, generation=False)
    one_gen = _render(template, [user], special_tokens, generation=True)
    two = _render(template, [user, assistant], special_tokens, generation=False)
    three = _render(template, [user, assistant, user], special_tokens, generation=False)
    head, user_suffix = one.split(u, 1)
    generation_prompt = _strip_prefix(one_gen, one, "generation prompt")
    assistant_prefix = _strip_prefix(_between(two, u, a), user_suffix, "assistant prefix")
    assistant_suffix = two.split(a, 1)[1]
    user_prefix = _strip_prefix(_between(three, a, u), assistant_suffix, "user prefix")
    leading = _strip_suffix(head, user_prefix, "user prefix")
    system: tuple[str, str] | None = None
    folded: str | None = None
    try:
        with_system = _render(template, [{"role": "system", "content": sy}, user], special_tokens, generation=False)
    except Exception:  # a template that refuses system turns (raise_exception)
        with_system = None
    if with_system is not None and sy not in with_system:
        with_system = None  # a template that drops system messages: the Modelfile has no system branch either
    if with_system is not None:
        before, after = with_system.split(sy, 1)
        if before == leading + user_prefix and after.endswith(u + user_suffix):
            folded = after[: -len(u + user_suffix)]  # [system, user] → L Up SY sep U Us
        else:
            try:
                system = (_strip_prefix(before, leading, "system prefix"),
                          _strip_suffix(_between(with_system, sy, u), user_prefix, "system suffix"))
            except ValueError:  # a template that treats system turns some other way: left out
                system = None
    pieces = [user_prefix, user_suffix, assistant_prefix, assistant_suffix, generation_prompt, leading,
              *(system or ()), folded or ""]
    if any(sentinel in piece for piece in pieces for sentinel in _SENTINEL.values()):
        # a message's content rendered twice (or elsewhere than its turn): no fixed prefix/suffix reproduces that
        raise ValueError("the template renders a message's content outside its own turn")
    return ChatFormat(system, (user_prefix, user_suffix), (assistant_prefix, assistant_suffix), generation_prompt,
                      leading, folded)


def go_template(fmt: ChatFormat) -> str:
    """The Ollama (Go text/template) equivalent. Only the opening action trims: a "{{-" after literal text would eat
    that text's trailing newline, which is part of the turn format."""

    def esc(text: str) -> str:
        return text.replace("{{", '{{ "{{" }}')

    def branch(keyword: str, role: str, affixes: tuple[str, str]) -> str:
        return f'{{{{ {keyword} eq .Role "{role}" }}}}{esc(affixes[0])}{{{{ .Content }}}}{esc(affixes[1])}'

    if fmt.system_in_first_user is not None:
        # Keep the system message and emit it inside the next user turn, as the template does.
        user = (f'{{{{ else if eq .Role "user" }}}}{esc(fmt.user[0])}{{{{ if $system }}}}{{{{ $system }}}}'
                f'{esc(fmt.system_in_first_user)}{{{{ $system = "" }}}}{{{{ end }}}}{{{{ .Content }}}}{esc(fmt.user[1])}')
        branches = ['{{ if eq .Role "system" }}{{ $system = .Content }}', user,
                    branch("else if", "assistant", fmt.assistant)]
        return ('{{- $system := "" }}{{- range .Messages }}' + "".join(branches) + "{{ end }}{{ end }}"
                + esc(fmt.generation_prompt))
    branches = []
    if fmt.system is not None:
        branches.append(branch("if", "system", fmt.system))
    branches.append(branch("else if" if branches else "if", "user", fmt.user))
    branches.append(branch("else if", "assistant", fmt.assistant))
    return "{{- range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + esc(fmt.generation_prompt)


def modelfile(gguf_file_name: str, chat_template: str | None, special_tokens: dict[str, str],
              stop_strings: list[str]) -> tuple[str, list[str]]:
    """The Modelfile text and notes about what could not be carried over."""
    notes: list[str] = []
    lines = [f"FROM ./{gguf_file_name}"]
    stops = list(dict.fromkeys(s for s in stop_strings if s))
    if chat_template:
        try:
            fmt = derive_chat_format(chat_template, special_tokens)
            lines.append(f'TEMPLATE """{go_template(fmt)}"""')
            bos = special_tokens.get("bos_token") or ""
            if fmt.leading and fmt.leading != bos:
                notes.append(f"the chat template starts every conversation with {fmt.leading!r}, which the "
                             "Ollama TEMPLATE leaves out")
            end_of_turn = fmt.assistant[1].strip()
            if end_of_turn:
                stops.insert(0, end_of_turn)
        except Exception as e:  # any template we cannot cut cleanly: say so rather than guess
            notes.append(f"the chat template could not be translated for Ollama ({e}); the Modelfile has no TEMPLATE")
    else:
        notes.append("the model has no chat template; the Modelfile has no TEMPLATE")
    for stop in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n", notes
