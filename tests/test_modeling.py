from __future__ import annotations

import hashlib

import pytest
import torch

from autotuning.config import load_config
from autotuning.errors import ModelError
from autotuning.modeling import BUILTIN_MODELS, ensure_builtin_model, load_model, load_tokenizer


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_builtin_build_is_deterministic(tmp_path, monkeypatch):
    first = ensure_builtin_model("builtin:tiny-llama")
    monkeypatch.setenv("AUTOTUNING_CACHE", str(tmp_path))
    second = ensure_builtin_model("builtin:tiny-llama")
    assert first != second
    assert _digest(first) == _digest(second)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_models_load_with_chat_template_and_64_multiple_sizes(name):
    config = load_config(None, [f"model_name=builtin:{name}"])
    tokenizer = load_tokenizer(config)
    model = load_model(config).model
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.in_features % 64 == 0  # bitsandbytes 4-bit on CPU needs this
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_unknown_builtin_lists_the_real_ones():
    with pytest.raises(ModelError) as err:
        ensure_builtin_model("builtin:tiny-mamba")
    assert "builtin:tiny-llama" in str(err.value)


def test_a_model_that_needs_its_own_code_says_so_instead_of_not_found(tmp_path):
    import json

    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps({"model_type": "acme-lm", "auto_map": {"AutoConfig": "configuration_acme.AcmeConfig"}})
    )
    config = load_config(None, [f"model_name={model_dir}"])
    with pytest.raises(ModelError) as err:
        load_model(config)
    assert "needs its own Python code" in str(err.value) and "trust_remote_code: true" in str(err.value)
