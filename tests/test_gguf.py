"""GGUF export through llama.cpp's own converter, every file checked in llama.cpp itself.

Small models of the architectures users fine-tune, built here with random weights (a large init range, so their
logits are peaked and a conversion error shows), each with a real tokenizer kind: the builtin byte-level BPE, or a
SentencePiece model trained here (``tokenizer.model``, which the converter asks for on Gemma 2 and Phi-3). Each is
converted to f32 and must pass the whole check at the f32 bound: llama.cpp's tokenisation, the chat prompt from
the GGUF's embedded template, logits at every position, greedy agreement, and the end-of-turn token stopping
generation. In CI the llama.cpp check is never skipped (``.ci/run`` installs llama-cpp-python).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

from autotuning.export import gguf as gguf_export
from autotuning.export.gguf_check import CHECK_TEXT
from autotuning.export.verify import GREEDY_TOKENS

PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def _llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed: .ci/run installs it, and CI never skips the GGUF check")
        pytest.skip("llama-cpp-python is not installed (pip install '.[llama-cpp]')")


def _bpe_tokenizer():
    from autotuning.config import load_config
    from autotuning.modeling import load_tokenizer

    return load_tokenizer(load_config(None, []))


def _spm_tokenizer(folder, template: str, turn_tokens: list[str], family: str):
    """A SentencePiece BPE model trained on the bundled samples, loaded as the family's transformers tokenizer:
    Gemma's (no dummy prefix, as Gemma's own model) or Llama's (Phi-3 uses Llama 2's tokenizer)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    from autotuning.builtin import _corpus_files

    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for path in _corpus_files():
        for line in path.read_text(encoding="utf-8").splitlines():
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([*texts, CHECK_TEXT]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spm"),
        vocab_size=700,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=turn_tokens,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        add_dummy_prefix=family != "gemma",
        **({"bos_piece": "<bos>", "eos_piece": "<eos>"} if family == "gemma" else {}),
        minloglevel=2,
    )
    source = folder / "spm-tokenizer"
    source.mkdir()
    shutil.copy(folder / "spm.model", source / "tokenizer.model")
    # Llama 2's tokenizer as Phi-3 ships it: the legacy SentencePiece behaviour (a word after a special token
    # starts with "▁"), which is what llama.cpp's SPM tokenizer does.
    if family == "gemma":
        tokenizer = GemmaTokenizer.from_pretrained(source)
    else:
        tokenizer = LlamaTokenizer.from_pretrained(source, legacy=True)
    from tokenizers import AddedToken

    # Phi-3's added tokens strip the whitespace after them (llama.cpp does the same for every phi3 model).
    rstrip = family != "gemma"
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, rstrip=rstrip, special=True, normalized=False) for t in turn_tokens
            ]
        }
    )
    tokenizer.chat_template = template
    return tokenizer


def _config(name: str, tokenizer):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if name == "llama3-rope-scaling":  # every Llama 3.1/3.2: llama.cpp needs the rope_freqs tensor for it
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(rope_parameters=rope, **common)
    if name == "qwen3-head-dim-96":  # head_dim 96 where hidden/heads is 32, as on Qwen3-0.6B
        return Qwen3Config(head_dim=96, **common)
    if name == "mistral":
        return MistralConfig(**common)
    # Gemma: sliding windows, head_dim 64 != 32, tied embeddings, norm offsets. llama.cpp scales attention by
    # 1/sqrt(head_dim) (as every released Gemma 3 but 27B does), so query_pre_attn_scalar follows head_dim.
    if name == "gemma3":
        return Gemma3TextConfig(head_dim=64, sliding_window=16, query_pre_attn_scalar=64, **common)
    if name == "gemma2":
        return Gemma2Config(head_dim=64, sliding_window=16, query_pre_attn_scalar=64, **common)
    if name == "phi3":
        return Phi3Config(**{**common, "num_key_value_heads": 4})
    raise ValueError(name)


SMALL = {
    "llama3-rope-scaling": None,
    "qwen3-head-dim-96": None,
    "mistral": None,
    "gemma3": None,
    "gemma2": ("GEMMA", ["<start_of_turn>", "<end_of_turn>"]),
    # Phi-3's own added tokens; llama.cpp looks <|endoftext|> up in any model whose name says phi3.
    "phi3": (PHI3_TEMPLATE, ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]),
}


def _small_model(tmp_path, name: str, **overrides):
    from transformers import AutoModelForCausalLM

    from autotuning.packaged import GEMMA_CHAT_TEMPLATE

    spec = SMALL[name]
    if spec is None:
        tokenizer = _bpe_tokenizer()
    else:
        template = GEMMA_CHAT_TEMPLATE if spec[0] == "GEMMA" else spec[0]
        tokenizer = _spm_tokenizer(
            tmp_path / "spm", template, spec[1], "gemma" if name.startswith("gemma") else "llama"
        )
    torch.manual_seed(0)
    model_dir = tmp_path / name
    config = _config(name, tokenizer)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if (tmp_path / "spm" / "spm.model").is_file():
        shutil.copy(tmp_path / "spm" / "spm.model", model_dir / "tokenizer.model")
    return model_dir, tokenizer


@pytest.mark.parametrize("name", list(SMALL))
def test_small_architectures_convert_and_match_in_llama_cpp_at_f32(tmp_path, name):
    model_dir, tokenizer = _small_model(tmp_path, name)
    info = gguf_export.write_gguf(model_dir, model_dir / "m.gguf", "f32")
    figures = gguf_export.verify_gguf(model_dir / "m.gguf", model_dir, "f32", tokenizer)
    print(
        f"\n{name} ({info['architecture']}, pre-tokenizer {info['pre_tokenizer']}): rel logit diff "
        f"{figures['rel_logit_diff']:.2e} on logits up to {figures['reference_logit_scale']:.3g}, top-1 "
        f"{figures['top1_agreement']:.1%}, greedy {figures['greedy_agreement_tokens']}/{GREEDY_TOKENS}"
    )
    assert figures["status"] == "verified", figures["reason"]
    assert figures["rel_logit_diff"] <= 1e-3 and figures["top1_agreement"] >= 0.98  # the f32 bound (verify.py)
    assert figures["tokenizer_ids_match"] and figures["chat_prompt_ids_match"] and figures["chat_template_present"]
    assert figures["end_of_turn_stops"] and all(figures["end_of_turn_stops"].values())


def test_a_llama3_gguf_converted_without_its_rope_scaling_fails_the_check(tmp_path):
    """The defect issue 15 saw (no rope_freqs): the same weights with the scaling dropped from config.json
    convert to a file llama.cpp runs with plain rope, which the check must refuse."""
    model_dir, tokenizer = _small_model(tmp_path, "llama3-rope-scaling")
    wrong = tmp_path / "without-scaling"
    shutil.copytree(model_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (wrong / "config.json").write_text(json.dumps(config))
    gguf_export.write_gguf(wrong, wrong / "m.gguf", "f32")
    figures = gguf_export.verify_gguf(wrong / "m.gguf", model_dir, "f32", tokenizer)
    assert figures["status"] == "unverified" and "relative logit diff" in figures["reason"]
    print(f"\nllama3 without rope scaling: rel logit diff {figures['rel_logit_diff']:.3g}")


def test_a_gemma3_that_llama_cpp_would_run_wrong_fails_the_check(tmp_path):
    """llama.cpp ignores Gemma 3's query_pre_attn_scalar (it scales by 1/sqrt(head_dim)): a model where the two
    differ converts, loads and answers, and the check says it is wrong."""
    model_dir, tokenizer = _small_model(tmp_path, "gemma3", query_pre_attn_scalar=256)
    gguf_export.write_gguf(model_dir, model_dir / "m.gguf", "f32")
    figures = gguf_export.verify_gguf(model_dir / "m.gguf", model_dir, "f32", tokenizer)
    assert figures["status"] == "unverified" and "relative logit diff" in figures["reason"]
    print(f"\ngemma3 with query_pre_attn_scalar 256 != head_dim 64: rel logit diff {figures['rel_logit_diff']:.3g}")


def test_every_type_is_offered_and_the_unknown_ones_refused():
    from autotuning.config import GgufType
    from autotuning.errors import ConfigError

    assert set(GgufType.values()) == set(gguf_export.GGUF_TYPES)
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        gguf_export.check_gguf_type("q3_k_xl")


def test_the_converter_refuses_what_it_cannot_convert_and_says_so():
    from autotuning.errors import ConfigError

    assert gguf_export.check_gguf_supported(["Gemma3ForCausalLM"]) == "Gemma3ForCausalLM"
    assert "Phi3ForCausalLM" in gguf_export.converter_architectures()
    with pytest.raises(ConfigError, match="llama.cpp's converter .* cannot convert the OPTForCausalLM"):
        gguf_export.check_gguf_supported(["OPTForCausalLM"])
