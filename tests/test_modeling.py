from __future__ import annotations

import hashlib
import json

import pytest
import torch

from autotuning import builtin
from autotuning.config import load_config
from autotuning.errors import ModelError
from autotuning.modeling import BUILTIN_MODELS, ensure_builtin_model, load_model, load_tokenizer


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_builtin_build_is_deterministic_and_leaves_process_state_alone(tmp_path, monkeypatch):
    """The build runs in a process of its own: this process's RNG and thread count, which a training job in another
    thread depends on, stay as they were."""
    first = ensure_builtin_model("builtin:tiny-llama")
    monkeypatch.setenv("AUTOTUNING_CACHE", str(tmp_path))
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    second = ensure_builtin_model("builtin:tiny-llama")
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert first != second
    assert _digest(first) == _digest(second)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_a_builtin_build_that_another_process_finished_first_keeps_theirs(tmp_path, monkeypatch):
    """Two processes building at once: the one whose folder is renamed into place second keeps the first's."""
    monkeypatch.setenv("AUTOTUNING_CACHE", str(tmp_path))
    target = tmp_path / "builtin" / f"tiny-llama-{builtin._corpus_digest()}"

    def build_and_lose_the_race(model_name, out):
        target.mkdir()
        for name in ("config.json", "tokenizer.json"):
            (target / name).write_text("theirs")
        (out / "autotuning_builtin.json").write_text(json.dumps({"pretrain_final_loss": 1.0}))
        (out / "config.json").write_text("ours")

    monkeypatch.setattr(builtin, "_build_in_child", build_and_lose_the_race)
    assert ensure_builtin_model("builtin:tiny-llama") == target
    assert (target / "config.json").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # our temporary folder is gone


def test_a_failed_builtin_build_says_what_the_build_process_said(tmp_path):
    with pytest.raises(ModelError) as err:
        builtin._build_in_child("builtin:tiny-mamba", tmp_path)  # ensure_builtin_model refuses it before any build
    assert "exit status 1" in str(err.value) and "unknown builtin model 'builtin:tiny-mamba'" in str(err.value)


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


@pytest.mark.parametrize(
    ("name", "capability", "emulated_bf16", "expected"),
    [
        ("Tesla T4", (7, 5), True, "fp16"),  # is_bf16_supported() says True there: emulation, not native
        ("Tesla V100", (7, 0), True, "fp16"),
        ("NVIDIA A100", (8, 0), True, "bf16"),
        ("NVIDIA H200", (9, 0), True, "bf16"),
    ],
)
def test_auto_precision_on_a_gpu_follows_the_compute_capability(monkeypatch, name, capability, emulated_bf16, expected):
    from autotuning.config import Precision
    from autotuning.errors import ConfigError
    from autotuning.modeling import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: emulated_bf16)
    assert resolve_precision(Precision.AUTO) == expected
    if expected == "fp16":
        with pytest.raises(ConfigError, match=rf"{name}.*compute capability {capability[0]}\.{capability[1]}"):
            resolve_precision(Precision.BF16)
    else:
        assert resolve_precision(Precision.BF16) == "bf16"


class _BrokenBf16(torch.nn.Module):
    """A model whose bf16-autocast forward is far off its fp32 forward, as on a CPU with broken bf16 kernels."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        if torch.is_autocast_enabled("cpu"):
            out.logits = out.logits + 5 * torch.randn_like(out.logits.float())
        return out


def test_cpu_bf16_check_passes_real_kernels_and_catches_broken_ones():
    from autotuning.modeling import check_cpu_bf16

    config = load_config(None, ["model_name=builtin:tiny-llama"])
    tokenizer = load_tokenizer(config)
    model = load_model(config).model
    rows = [tokenizer("A short row.")["input_ids"], tokenizer("A longer row, so the first one is padded.")["input_ids"]]
    good = check_cpu_bf16(model, rows, tokenizer.pad_token_id)
    assert good["ok"] and good["max_relative_logit_diff"] < good["max_relative_bound"] and good["top1_agreement"] >= 0.8
    torch.manual_seed(0)
    bad = check_cpu_bf16(_BrokenBf16(model), rows, tokenizer.pad_token_id)
    assert not bad["ok"] and bad["max_relative_logit_diff"] > bad["max_relative_bound"]
    model.train()
    check_cpu_bf16(model, rows, tokenizer.pad_token_id)
    assert model.training  # the check restores the mode it found


@pytest.mark.real_model
@pytest.mark.parametrize("name,chosen", [("smollm2", "ChatML"), ("gemma3", "plain-text")])
def test_a_real_tokenizer_without_a_chat_template_gets_one_built_on_its_own_tokens(
    name, chosen, request, tmp_path, caplog
):
    """SmolLM2 has <|im_start|>/<|im_end|> in its vocabulary, Gemma does not: neither may gain a token, since that
    would give ids past the model's embedding table."""
    import json
    import shutil

    from autotuning.data import encode_example, end_of_turn_token_ids

    source = request.getfixturevalue(f"{name}_dir")
    stripped = tmp_path / name
    stripped.mkdir()
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # not chat_template.jinja
        shutil.copy(source / file, stripped / file)
    assert "chat_template" not in json.loads((stripped / "tokenizer_config.json").read_text())
    vocab_size = json.loads((source / "config.json").read_text())["vocab_size"]
    with caplog.at_level("WARNING", logger="autotuning.modeling"):
        tokenizer = load_tokenizer(load_config(None, [f"model_name={stripped}"]))
    assert f"has no chat template; using a {chosen} template" in caplog.text
    assert len(tokenizer) <= vocab_size

    answers = ["Paris is the capital of France.", "Rome, on the Tiber.", "A spider has eight legs."]
    turns = [{"role": "system", "content": "Be brief."}]
    for question, answer in zip(["Capital of France?", "And of Italy?", "Legs of a spider?"], answers):
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    enc = encode_example(tokenizer, {"prompt": turns[:-1], "completion": turns[-1:]}, 512)
    assert max(enc.input_ids) < vocab_size
    runs, run, previous = [], [], 0
    for token, trained in zip(enc.input_ids + [0], enc.completion_mask + [0]):
        if previous and not trained:
            runs.append(tokenizer.decode(run))
            run = []
        if trained:
            run.append(token)
        previous = trained
    assert runs == [answer + tokenizer.eos_token for answer in answers]
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.eos_token_id]
    if name == "gemma3":  # its tokenizer starts every text with <bos>, so the template does too
        assert enc.input_ids[0] == tokenizer.bos_token_id and enc.input_ids[1] != tokenizer.bos_token_id
    tokenizer.save_pretrained(tmp_path / "export")  # what the exported model carries
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "export").chat_template == tokenizer.chat_template


def test_qlora_keeps_the_unquantized_base_in_its_half_precision_dtype():
    # On a GPU under bf16 the base loads in bf16; PEFT's prepare_model_for_kbit_training makes the norms,
    # embeddings and head fp32, which would run the residual stream in fp32. apply_peft puts them back. The same
    # load on CPU (bitsandbytes' CPU 4-bit kernels) checks it without a GPU.
    from transformers import BitsAndBytesConfig

    from autotuning.modeling import apply_peft, load_pretrained, resolve_model_path

    config = load_config(None, ["model_name=builtin:tiny-llama", "quantization=4bit", "peft_type=qlora"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = load_pretrained(
        config, resolve_model_path(config.model.model_name), dtype=torch.bfloat16, quantization_config=quant
    )
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 20, 33]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    peft_model = apply_peft(model, config)
    frozen = {n: p.dtype for n, p in peft_model.named_parameters() if p.is_floating_point() and not p.requires_grad}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen
    assert any("norm" in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # the adapters train in fp32
    out = peft_model(input_ids=ids, labels=ids)
    assert torch.equal(out.logits.float(), before)  # a fresh adapter (B = 0) changes nothing
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
