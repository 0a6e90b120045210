"""The Ollama Modelfile of a GGUF export, built from the model's own chat template.

Ollama does not run Jinja: its TEMPLATE is Go's ``text/template``. Instead of keeping a table of known
templates, the HF template is rendered on a few conversations of marker strings, and each role's wrapping text
(what comes before and after its content), the generation prompt and the default system prompt are read off
the renders. The Go template rebuilds exactly that text; ``tests/test_ollama.py`` renders conversations through
it (a faithful ``text/template`` emulation) and compares them with the HF template's.

Two system-prompt layouts are recognised: a system turn of its own (ChatML: SmolLM2, Qwen) and a system prompt
folded into the first user turn (Gemma). A default system prompt the template inserts when a conversation has
none (SmolLM2's) becomes the Modelfile's SYSTEM, which Ollama inserts the same way. The BOS text a template
starts with is left out: llama.cpp adds BOS itself when the file says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..data.encoding import end_of_turn_token_ids

__all__ = ["ChatLayout", "chat_layout", "assemble", "go_template", "modelfile"]

log = logging.getLogger(__name__)

_S, _U1, _A1, _U2 = "\ue000S\ue000", "\ue000U1\ue000", "\ue000A1\ue000", "\ue000U2\ue000"


@dataclass(frozen=True)
class ChatLayout:
    user: tuple[str, str]  # text before and after a user turn's content
    assistant: tuple[str, str]
    generation: str  # what the template appends for the model's turn
    system: tuple[str, str] | None  # a system turn of its own, or None when it is folded into the first user turn
    system_joiner: str  # folded: between the system prompt and the first user message
    default_system: str  # inserted by the template when a conversation has no system turn ("" = none)


_CHECKS = [
    [{"role": "user", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


def _without_bos(text: str, bos: str) -> str:
    return text[len(bos) :] if bos and text.startswith(bos) else text


def assemble(layout: ChatLayout, messages: list[dict]) -> str:
    """The text the Go template renders for ``messages`` (Ollama's SYSTEM inserted when there is no system turn)."""
    if layout.default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": layout.default_system}, *messages]
    out, pending = [], ""
    for m in messages:
        if m["role"] == "system":
            if layout.system is None:
                pending = m["content"]
            else:
                out += [layout.system[0], m["content"], layout.system[1]]
        elif m["role"] == "user":
            out.append(layout.user[0])
            if pending:
                out += [pending, layout.system_joiner]
                pending = ""
            out += [m["content"], layout.user[1]]
        else:
            out += [layout.assistant[0], m["content"], layout.assistant[1]]
    return "".join(out) + layout.generation


def _render(tokenizer, messages, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start) + len(start)
    return text[i : text.index(end, i)]


def chat_layout(tokenizer) -> ChatLayout:
    """Read the template's layout off its renders; ValueError when it does not follow one we can rebuild."""
    user1 = [{"role": "user", "content": _U1}]
    turn = [*user1, {"role": "assistant", "content": _A1}]
    three = [*turn, {"role": "user", "content": _U2}]
    bare = _render(tokenizer, user1, False)
    with_gen = _render(tokenizer, user1, True)
    if not with_gen.startswith(bare):
        raise ValueError("the generation prompt is not appended to the conversation")
    generation = with_gen[len(bare) :]
    user_after = bare[bare.index(_U1) + len(_U1) :]
    answered = _render(tokenizer, turn, False)
    assistant_before = _between(answered, _U1 + user_after, _A1) if user_after else _between(answered, _U1, _A1)
    between = _between(_render(tokenizer, three, False), _A1, _U2)
    head = bare[: bare.index(_U1)]
    # `between` is the assistant's closing then the user's opening. Most templates close every turn alike;
    # otherwise the longest user opening that also opens the first turn.
    splits = [k for k in range(len(between) + 1) if head.endswith(between[k:])]
    k = len(user_after) if between.startswith(user_after) and len(user_after) in splits else splits[0]
    assistant_after, user_before = between[:k], between[k:]
    head = head[: len(head) - len(user_before)]
    bos = tokenizer.bos_token or ""
    if bos and head.startswith(bos):
        head = head[len(bos) :]
    with_system = _render(tokenizer, [{"role": "system", "content": _S}, *user1], False)
    if bos and with_system.startswith(bos):
        with_system = with_system[len(bos) :]
    if with_system.startswith(user_before + _S):  # folded into the first user turn
        joiner = _between(with_system, _S, _U1)
        if head:
            raise ValueError("a default system prompt outside a system turn")
        system, default = None, ""
    else:
        system_before = with_system[: with_system.index(_S)]
        system_after = _between(with_system, _S, user_before + _U1) if user_before else _between(with_system, _S, _U1)
        system, joiner = (system_before, system_after), ""
        default = ""
        if head:
            if not (head.startswith(system_before) and head.endswith(system_after)):
                raise ValueError("text before the first turn that is not a system turn")
            default = head[len(system_before) : len(head) - len(system_after)]
    layout = ChatLayout(
        (user_before, user_after), (assistant_before, assistant_after), generation, system, joiner, default
    )
    for messages in _CHECKS:  # the layout must rebuild the template's text, or there is no TEMPLATE at all
        if assemble(layout, messages) != _without_bos(_render(tokenizer, messages, True), bos):
            raise ValueError(f"the rebuilt template renders {messages} unlike the chat template")
    for part in (*layout.user, *layout.assistant, layout.generation, *(layout.system or ()), layout.system_joiner):
        if "\ue000" in part or "{{" in part or '"""' in part:
            raise ValueError("the template's text cannot be written as a Go template")
    return layout


def go_template(layout: ChatLayout) -> str:
    """The Go text/template that renders Ollama's ``.Messages`` as the HF template does (no trim markers: every
    character of text between actions is kept)."""
    user_before, user_after = layout.user
    a_before, a_after = layout.assistant
    if layout.system is not None:
        s_before, s_after = layout.system
        return (
            f'{{{{ range .Messages }}}}{{{{ if eq .Role "system" }}}}{s_before}{{{{ .Content }}}}{s_after}'
            f'{{{{ else if eq .Role "user" }}}}{user_before}{{{{ .Content }}}}{user_after}'
            f'{{{{ else if eq .Role "assistant" }}}}{a_before}{{{{ .Content }}}}{a_after}'
            f"{{{{ end }}}}{{{{ end }}}}{layout.generation}"
        )
    return (
        '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}'
        f'{{{{ else if eq .Role "user" }}}}{user_before}'
        f'{{{{ if $system }}}}{{{{ $system }}}}{layout.system_joiner}{{{{ $system = "" }}}}{{{{ end }}}}'
        f"{{{{ .Content }}}}{user_after}"
        f'{{{{ else if eq .Role "assistant" }}}}{a_before}{{{{ .Content }}}}{a_after}'
        f"{{{{ end }}}}{{{{ end }}}}{layout.generation}"
    )


def _stop_strings(tokenizer) -> list[str]:

    ids = [*end_of_turn_token_ids(tokenizer), tokenizer.eos_token_id]
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None))


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile: the GGUF, a TEMPLATE rebuilt from the chat template, SYSTEM and stop tokens."""
    lines = [f"FROM ./{gguf_name}"]
    try:
        layout = chat_layout(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    except (ValueError, Exception) as exc:  # a template we cannot rebuild: Ollama's own detection from the GGUF
        log.warning("gguf: the Modelfile has no TEMPLATE (the chat template could not be rebuilt: %s)", exc)
        layout = None
    if layout is None:
        lines.append("# No TEMPLATE: Ollama picks one from the chat template stored in the GGUF.")
    else:
        lines.append(f'TEMPLATE """{go_template(layout)}"""')
        if layout.default_system:
            lines.append(f'SYSTEM """{layout.default_system}"""')
    for stop in _stop_strings(tokenizer):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
