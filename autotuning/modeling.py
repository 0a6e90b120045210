"""Tokenizer and model loading: builtin tiny models, Hub ids, local dirs; quantization; PEFT.

The builtin models (``builtin:tiny-llama``, ``builtin:tiny-gpt2``, ``builtin:tiny-qwen2``) exist so
that everything works offline: they are built on first use, deterministically, from a byte-level
BPE tokenizer trained on the bundled sample datasets and a ~1M-parameter network (fixed-seed
initialisation, then a few seconds of pretraining on the same text), then cached. Their hidden and intermediate sizes are multiples of 64 because
bitsandbytes' 4-bit CPU kernels need every Linear input size to be a multiple of 64.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, PeftType, Precision, Quantization
from .errors import ConfigError, ModelError
from .hub import hub_reachable
from .resources import ASSETS

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "CHATML_TEMPLATE",
    "cache_root",
    "is_builtin",
    "ensure_builtin_model",
    "resolve_model_path",
    "load_tokenizer",
    "load_model",
    "apply_peft",
    "resolve_precision",
    "cpu_supports_bf16",
    "LoadedModel",
]

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


def cache_root() -> Path:
    """Where builtin models are cached: $AUTOTUNING_CACHE, else ~/.cache/autotuning."""
    env = os.environ.get("AUTOTUNING_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autotuning"


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

    for path in sorted(_ASSETS.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                collect(json.loads(line))
    return texts


def _corpus_digest() -> str:
    h = hashlib.sha256(_BUILTIN_RECIPE_VERSION.encode())
    for path in sorted(_ASSETS.glob("*.jsonl")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    if architecture == "llama":
        cfg = LlamaConfig(
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
    elif architecture == "qwen2":
        cfg = Qwen2Config(
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
    torch.manual_seed(0)  # deterministic initialisation: the same weights on every machine
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
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    model.train()
    loss = float("nan")
    try:
        for _ in range(_PRETRAIN_STEPS):
            batch = blocks[torch.randint(0, blocks.shape[0], (_PRETRAIN_BATCH,), generator=generator)]
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = out.loss.item()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return loss


def ensure_builtin_model(model_name: str) -> Path:
    """Build (once) and return the directory of a builtin tiny model and its tokenizer."""
    short, spec = _builtin_spec(model_name)
    target = cache_root() / "builtin" / f"{short}-{_corpus_digest()}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    log.info("building %s (%s) into %s", model_name, spec.description, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{short}-", dir=target.parent))
    try:
        tokenizer = _train_tokenizer()
        model = _build_model(spec.architecture, tokenizer)
        final_loss = _pretrain(model, tokenizer)
        (tmp / "autotuning_builtin.json").write_text(
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
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build first; theirs is identical.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_name: str) -> str:
    """A local directory for builtin models, otherwise the name unchanged (Hub id or path)."""
    if is_builtin(model_name):
        return str(ensure_builtin_model(model_name))
    return model_name


def _hub_error(model_name: str, exc: Exception, what: str) -> ModelError:
    if "trust_remote_code" in str(exc):
        # The model exists (local or Hub) but ships its own Python code: say that, not "not found".
        return ModelError(
            f"the {what} '{model_name}' needs its own Python code from the repository to load",
            "field 'model_name'",
            "set trust_remote_code: true if you trust its author (the code runs on this machine), "
            "or pick a model that transformers supports natively",
        )
    offline = not hub_reachable()
    local_hint = Path(model_name).expanduser().exists()
    if local_hint:
        return ModelError(
            f"cannot load the {what} from local directory '{model_name}' ({type(exc).__name__}: {exc})".replace(
                "\n", " "
            )[:400],
            "field 'model_name'",
            "point model_name at a directory saved with save_pretrained (config.json, weights, tokenizer files)",
        )
    reason = "the Hub is not reachable from this machine" if offline else type(exc).__name__
    return ModelError(
        f"model '{model_name}' was not found as a local directory or on the Hugging Face Hub ({reason})",
        "field 'model_name'",
        "check the id or path, pass hf_token for gated models, or use builtin:tiny-llama offline",
    )


def _require_reachable(name: str, path: str) -> None:
    """A Hub id on a machine without the Hub: fail in seconds with the real reason, unless it is cached."""
    if Path(path).expanduser().exists() or hub_reachable():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # a cached copy loads offline
    except Exception:
        pass
    raise _hub_error(name, OSError("hub unreachable"), "model")


def load_tokenizer(config: Config):
    """The tokenizer for ``config.model.model_name``, with a pad token and a chat template guaranteed."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = config.model.model_name
    path = resolve_model_path(name)
    _require_reachable(name, path)
    try:
        if is_builtin(name):
            # AutoTokenizer would swap in the architecture's own tokenizer class (e.g. Qwen2Tokenizer), which
            # replaces our pre-tokenizer; the fast generic class keeps the saved one exactly.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                path,
                token=config.model.hf_token or None,
                trust_remote_code=config.model.trust_remote_code,
            )
    except ModelError:
        raise
    except Exception as exc:  # the Hub client raises many types; all mean "cannot get it"
        raise _hub_error(name, exc, "tokenizer") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        log.warning("%s has no chat template; using a ChatML template (it is saved with the exported model)", name)
        tokenizer.chat_template = CHATML_TEMPLATE
        if "<|im_end|>" not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512_BF16 or AMX): bf16 autocast is then faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: Precision) -> str:
    """Turn 'auto' into what this machine runs best; refuse what it cannot run."""
    cuda = torch.cuda.is_available()
    if precision is Precision.AUTO:
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision is Precision.FP16 and not cuda:
        raise ConfigError(
            "fp16 mixed precision needs a CUDA GPU", "field 'precision'", "use precision: auto, bf16 or fp32 on CPU"
        )
    if precision is Precision.BF16 and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16", "field 'precision'", "use precision: fp16 or auto")
    return precision.value


def _compute_dtype(config: Config) -> torch.dtype:
    choice = config.quantization.bnb_4bit_compute_dtype
    resolved = resolve_precision(choice) if choice is not Precision.AUTO else resolve_precision(Precision.AUTO)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolved]


def _check_4bit_shapes(path: str, config: Config) -> None:
    """bitsandbytes' CPU 4-bit kernels need Linear input sizes that are multiples of 64: fail before loading."""
    if torch.cuda.is_available():
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    model_cfg = AutoConfig.from_pretrained(
        path, token=config.model.hf_token or None, trust_remote_code=config.model.trust_remote_code
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_cfg, trust_remote_code=config.model.trust_remote_code)
    bad = sorted(
        {
            f"{name} (in_features={module.in_features})"
            for name, module in skeleton.named_modules()
            if isinstance(module, torch.nn.Linear) and module.in_features % 64 and not name.endswith("lm_head")
        }
    )
    if bad:
        raise ConfigError(
            f"4-bit quantization on CPU needs every linear layer's input size to be a multiple of 64; "
            f"{len(bad)} layers are not, e.g. {bad[0]}",
            "fields 'quantization'/'model_name'",
            "use quantization: 8bit (works at any size), a GPU, or a model whose sizes are multiples of 64",
        )


@dataclass
class LoadedModel:
    model: torch.nn.Module
    path: str  # directory or Hub id the weights came from (the base for merging)
    precision: str  # resolved training precision: fp32 | bf16 | fp16


def _has_pickle_weights(path: str, config: Config) -> bool:
    """Does the model directory or Hub repo hold .bin/.pt weights (and no safetensors)?"""
    local = Path(path).expanduser()
    if local.is_dir():
        names = [p.name for p in local.iterdir()]
    else:
        try:
            from huggingface_hub import list_repo_files

            names = list_repo_files(path, token=config.model.hf_token or None)
        except Exception:
            return False
    return any(n.endswith((".bin", ".pt", ".pth")) for n in names) and not any(
        n.endswith(".safetensors") for n in names
    )


def load_model(config: Config, for_training: bool = True) -> LoadedModel:
    """Load the base model as configured: unquantized, or 4/8-bit with bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = config.model.model_name
    path = resolve_model_path(name)
    precision = resolve_precision(config.training.precision)
    quant = config.quantization.quantization
    kwargs: dict[str, Any] = {
        "token": config.model.hf_token or None,
        "trust_remote_code": config.model.trust_remote_code,
        # Pickled weights can execute code on load: safetensors only, unless the user opted in.
        "use_safetensors": None if config.model.allow_pickle_weights else True,
    }
    cuda = torch.cuda.is_available()
    # Weights stay fp32 on CPU (autocast does the bf16 math); on GPU half-precision weights halve memory.
    if cuda and precision in ("bf16", "fp16") and config.peft.peft_type is not PeftType.NONE:
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    if quant is not Quantization.NONE:
        if quant is Quantization.INT4:
            _check_4bit_shapes(path, config)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=_compute_dtype(config),
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if cuda:
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ConfigError:
        raise
    except ImportError as exc:
        raise ModelError(
            f"a library needed to load '{name}' is missing ({exc})",
            "field 'model_name'",
            "pip install -r requirements.txt",
        ) from None
    except Exception as exc:
        if (
            not config.model.allow_pickle_weights
            and "safetensors" in str(exc).lower()
            and _has_pickle_weights(path, config)
        ):
            raise ModelError(
                f"'{name}' only ships pickle weights (.bin/.pt), which can run arbitrary code when loaded",
                "field 'model_name'",
                "use a safetensors copy of the model, or set allow_pickle_weights: true if you trust its author",
            ) from None
        raise _hub_error(name, exc, "model") from None
    if for_training and config.training.gradient_checkpointing:
        model.config.use_cache = False
    return LoadedModel(model=model, path=path, precision=precision)


def apply_peft(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """Wrap the model with LoRA adapters (QLoRA on a k-bit base), or leave it whole for a full fine-tune."""
    peft_type = config.peft.peft_type
    if peft_type is PeftType.NONE:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.quantization.quantization is not Quantization.NONE:
        # Casts norms to fp32 and enables input grads so gradients flow through the frozen k-bit base.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing
        )
    # The adapters' random initialisation happens here, before the Trainer seeds anything: seed it, so the same
    # seed gives the same run.
    from transformers import set_seed

    set_seed(config.training.seed)
    targets = config.peft.lora_target_modules
    target_modules: str | list[str] = "all-linear" if targets == ["all-linear"] else list(targets)
    lora = LoraConfig(
        r=config.peft.lora_r,
        lora_alpha=config.peft.lora_alpha,
        lora_dropout=config.peft.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(
            f"LoRA target modules do not match this model ({exc})".replace("\n", " ")[:400],
            "field 'lora_target_modules'",
            "use ['all-linear'] or names of the model's linear layers (e.g. q_proj, v_proj)",
        ) from None
