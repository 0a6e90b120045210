"""The Modelfile's TEMPLATE renders a conversation exactly as the model's HF chat template does."""

from __future__ import annotations

import re

import pytest
from gotemplate import render

from autotuning.export.ollama import chat_layout, modelfile

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?\nThink."},
    ],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thanks"},
    ],
]


def _ollama_render(text: str, messages: list[dict]) -> str:
    """What Ollama sends to llama.cpp: the Modelfile's SYSTEM inserted when the chat has no system message."""
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    return render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def _hf_render(tokenizer, messages) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    return text[len(bos) :] if bos and text.startswith(bos) else text  # llama.cpp adds BOS itself


def _tokenizer(request, which):
    from transformers import AutoTokenizer

    from autotuning.config import load_config
    from autotuning.modeling import load_tokenizer

    if which == "builtin":
        return load_tokenizer(load_config(None, []))
    return AutoTokenizer.from_pretrained(request.getfixturevalue(which))


@pytest.mark.parametrize(
    "which",
    [
        "builtin",
        pytest.param("smollm2_dir", marks=pytest.mark.real_model),
        pytest.param("gemma3_dir", marks=pytest.mark.real_model),
    ],
)
def test_modelfile_template_renders_like_the_hf_template(request, which):
    tokenizer = _tokenizer(request, which)
    text = modelfile("model-q8_0.gguf", tokenizer)
    for messages in CONVERSATIONS:
        assert _ollama_render(text, messages) == _hf_render(tokenizer, messages), messages
    layout = chat_layout(tokenizer)
    stops = re.findall(r'PARAMETER stop "(.*?)"', text)
    assert stops and all(s in tokenizer.get_vocab() for s in stops)
    if which == "smollm2_dir":  # ChatML with a default system prompt: a system turn of its own, SYSTEM set
        assert layout.system is not None and "SmolLM" in layout.default_system and "<|im_end|>" in stops
    if which == "gemma3_dir":  # the system prompt folded into the first user turn; no system role
        assert layout.system is None and "<end_of_turn>" in stops


def test_go_template_emulation_follows_go_trim_and_scope_rules():
    assert render("a  {{- .X -}}  b", {"X": "x"}) == "axb"
    assert (
        render(
            '{{ $v := "" }}{{ range .L }}{{ if $v }}{{ $v }},{{ end }}{{ $v = . }}{{ end }}{{ $v }}', {"L": ["1", "2"]}
        )
        == "1,2"
    )
    assert render('{{ if eq .R "a" }}A{{ else if eq .R "b" }}B{{ else }}C{{ end }}', {"R": "b"}) == "B"
