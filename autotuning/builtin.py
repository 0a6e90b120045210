"""The builtin tiny models: a factory that builds them offline, deterministically, and caches them.

``builtin:tiny-llama``, ``builtin:tiny-gpt2`` and ``builtin:tiny-qwen2`` exist so that everything works offline:
they are built on first use from a byte-level BPE tokenizer trained on the bundled sample datasets and a
~1M-parameter network (fixed-seed initialisation, then a few seconds of pretraining on the same text), then
cached. Their hidden and intermediate sizes are multiples of 64 because bitsandbytes' 4-bit CPU kernels need
every Linear input size to be a multiple of 64.

The build runs in a child process (``python -m autotuning.builtin <name> <dir> <threads>``): it seeds torch's
global RNG and sets the thread count, process-wide state that a training job in another thread of the app (the
Chat tab's first use of a builtin model happens while one may run) must never see change. Loading a model, builtin
or not, is :mod:`autotuning.modeling`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from .data.loading import SAMPLE_FILES
from .errors import ModelError
from .resources import ASSETS, cache_root

__all__ = ["BUILTIN_MODELS", "BUILTIN_PREFIX", "CHATML_TEMPLATE", "is_builtin", "ensure_builtin_model"]

log = logging.getLogger(__name__)


BUILTIN_PREFIX = "builtin:"
# Bump when the recipe below changes, so cached copies are rebuilt.
_BUILTIN_RECIPE_VERSION = "4"
_ASSETS = ASSETS / "datasets"

# ChatML with {% generation %} markers (TRL's assistant-only loss needs them) and no newline after
# the assistant's <|im_end|>, so the trained answer ends exactly on the EOS token.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_VOCAB_SIZE = 2048
_HIDDEN = 128  # multiple of 64 (bitsandbytes 4-bit on CPU)
_INTERMEDIATE = 256  # multiple of 64
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_CONTEXT = 1024


@dataclass(frozen=True)
class _BuiltinSpec:
    architecture: str  # llama | gpt2 | qwen2
    description: str


BUILTIN_MODELS: dict[str, _BuiltinSpec] = {
    "tiny-llama": _BuiltinSpec(
        "llama", "Llama architecture, 2 layers, hidden 128 (~0.9M parameters), briefly pretrained"
    ),
    "tiny-gpt2": _BuiltinSpec(
        "gpt2", "GPT-2 architecture, 2 layers, hidden 128 (~0.9M parameters), briefly pretrained"
    ),
    "tiny-qwen2": _BuiltinSpec(
        "qwen2", "Qwen2 architecture, 2 layers, hidden 128 (~0.9M parameters), briefly pretrained"
    ),
}


def is_builtin(model_name: str) -> bool:
    return model_name.startswith(BUILTIN_PREFIX)


def _builtin_spec(model_name: str) -> tuple[str, _BuiltinSpec]:
    short = model_name[len(BUILTIN_PREFIX) :]
    if short not in BUILTIN_MODELS:
        names = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ModelError(f"unknown builtin model '{model_name}'", "field 'model_name'", f"use one of: {names}")
    return short, BUILTIN_MODELS[short]


def _tokenizer_corpus() -> list[str]:
    """All text of the bundled samples, in a fixed order: the tokenizer's training corpus."""
    texts: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for key in sorted(value):
                collect(value[key])
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for path in _corpus_files():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                collect(json.loads(line))
    return texts


def _corpus_files() -> list[Path]:
    """The five fine-tuning types' bundled samples (not the quickstart's templated rows), in name order."""
    return sorted(_ASSETS / name for name in SAMPLE_FILES.values())


def _corpus_digest() -> str:
    h = hashlib.sha256(_BUILTIN_RECIPE_VERSION.encode())
    for path in _corpus_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _train_tokenizer():

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=_CONTEXT,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _build_model(architecture: str, tokenizer) -> torch.nn.Module:

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    if architecture in ("llama", "qwen2"):  # the same shapes; they differ in qkv biases and rope defaults
        config_class = LlamaConfig if architecture == "llama" else Qwen2Config
        cfg = config_class(
            vocab_size=vocab,
            hidden_size=_HIDDEN,
            intermediate_size=_INTERMEDIATE,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=_KV_HEADS,
            max_position_embeddings=_CONTEXT,
            tie_word_embeddings=False,
            **ids,
        )
    elif architecture == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=_HIDDEN,
            n_layer=_LAYERS,
            n_head=_HEADS,
            n_positions=_CONTEXT,
            n_inner=None,  # the standard 4 x hidden: GGUF and keras-hub readers assume it
            **ids,
        )
    else:  # pragma: no cover - guarded by BUILTIN_MODELS
        raise ValueError(architecture)
    # Deterministic initialisation: the same weights on every machine. Seeds the global RNG, which is why the build
    # runs in a process of its own (see _build_in_child).
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


_PRETRAIN_STEPS = 120
_PRETRAIN_BLOCK = 128
_PRETRAIN_BATCH = 8


def _pretrain(model: torch.nn.Module, tokenizer) -> float:
    """A few seconds of causal-LM training on the bundled text, so the base model is not pure noise.

    A randomly initialised output head keeps logits near uniform, and LoRA (which leaves the head frozen)
    could then barely move the loss: fine-tuning demos and tests would show nothing. Fixed seed, fixed
    thread count and fixed batch order make the result the same on every run of the same machine type.
    """
    ids: list[int] = []
    for text in _tokenizer_corpus():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    usable = len(ids) // _PRETRAIN_BLOCK * _PRETRAIN_BLOCK
    blocks = torch.tensor(ids[:usable], dtype=torch.long).view(-1, _PRETRAIN_BLOCK)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the build's own process: see _build_in_child
    model.train()
    loss = float("nan")
    for _ in range(_PRETRAIN_STEPS):
        batch = blocks[torch.randint(0, blocks.shape[0], (_PRETRAIN_BATCH,), generator=generator)]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
    model.eval()
    return loss


def _write_builtin(model_name: str, out: Path) -> None:
    """Build a builtin model and its tokenizer into ``out``. Seeds and sets process-wide state: child process only."""
    _short, spec = _builtin_spec(model_name)
    tokenizer = _train_tokenizer()
    model = _build_model(spec.architecture, tokenizer)
    final_loss = _pretrain(model, tokenizer)
    (out / "autotuning_builtin.json").write_text(
        json.dumps(
            {
                "name": model_name,
                "description": spec.description,
                "recipe_version": _BUILTIN_RECIPE_VERSION,
                "pretrain_steps": _PRETRAIN_STEPS,
                "pretrain_final_loss": round(final_loss, 4),
            },
            indent=2,
        )
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# The directory holding the autotuning package: the child process imports it from there, as this process did.
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def _build_in_child(model_name: str, out: Path) -> None:
    """Run :func:`_write_builtin` in a fresh Python process, its output (progress bars, warnings) passed through.

    The child starts with this process's thread count, so the build computes exactly what it computed in-process:
    the same weights, bit for bit, as every cached copy and every figure measured on them.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "autotuning.builtin", model_name, str(out), str(torch.get_num_threads())]
    last = ""  # the last line the child wrote: on a failure, the exception
    with subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        for raw in proc.stdout or ():
            line = raw.decode("utf-8", errors="replace")
            sys.stderr.write(line)
            last = line.strip() or last
    if proc.returncode != 0:
        raise ModelError(
            f"building {model_name} failed in its build process (exit status {proc.returncode}): {last or 'no output'}",
            "field 'model_name'",
            "the build's full output is above (stderr); if it names a missing library, pip install -r requirements.txt",
        )


def ensure_builtin_model(model_name: str) -> Path:
    """Build (once) and return the directory of a builtin tiny model and its tokenizer."""
    short, spec = _builtin_spec(model_name)
    target = cache_root() / "builtin" / f"{short}-{_corpus_digest()}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    log.info("building %s (%s) into %s", model_name, spec.description, target)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{short}-", dir=target.parent))
    try:
        _build_in_child(model_name, tmp)
        meta = json.loads((tmp / "autotuning_builtin.json").read_text())
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build first; theirs is identical.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "built %s in %.0f s (pretraining loss %.3f)",
        model_name,
        time.monotonic() - started,
        meta["pretrain_final_loss"],
    )
    return target


if __name__ == "__main__":  # the builtin build's child process: python -m autotuning.builtin NAME DIR THREADS
    torch.set_num_threads(int(sys.argv[3]))
    _write_builtin(sys.argv[1], Path(sys.argv[2]))
