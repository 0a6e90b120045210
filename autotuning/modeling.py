"""Tokenizer and model loading: builtin tiny models (built by :mod:`autotuning.builtin`), packaged real models,
Hub ids, local dirs; quantization; precision (and the CPU bf16 check); PEFT."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, list_repo_files, try_to_load_from_cache
from huggingface_hub.repocard import metadata_load
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerFast,
    set_seed,
)

from .builtin import BUILTIN_MODELS, BUILTIN_PREFIX, CHATML_TEMPLATE, ensure_builtin_model, is_builtin
from .concurrency import MODEL_LOADING
from .config import Config, PeftType, Precision, Quantization
from .errors import ConfigError, ModelError
from .hub import hub_reachable
from .packaged import PACKAGED_MODELS, PACKAGED_PREFIX, ensure_packaged_model, is_packaged
from .resources import cache_root

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "CHATML_TEMPLATE",
    "build_fallback_template",
    "cache_root",
    "recast_unquantized",
    "is_builtin",
    "ensure_builtin_model",
    "resolve_model_path",
    "hub_model_id",
    "base_model_license",
    "load_tokenizer",
    "load_model",
    "load_pretrained",
    "apply_peft",
    "resolve_precision",
    "cpu_supports_bf16",
    "cpu_bf16_kind",
    "gpu_supports_bf16",
    "check_cpu_bf16",
    "LoadedModel",
]

log = logging.getLogger(__name__)


def resolve_model_path(model_name: str) -> str:
    """A local directory for builtin and packaged models, otherwise the name unchanged (Hub id or path)."""
    if is_builtin(model_name):
        return str(ensure_builtin_model(model_name))
    if is_packaged(model_name):
        return str(ensure_packaged_model(model_name))
    return model_name


def hub_model_id(model_name: str) -> str | None:
    """The Hub id a model comes from, for a model card's ``base_model``: a Hub id as it is, a packaged model's
    original, None for a builtin model or a local directory (the Hub refuses a card naming a model it lacks)."""
    if is_builtin(model_name):
        return None
    if is_packaged(model_name):
        spec = PACKAGED_MODELS.get(model_name[len(PACKAGED_PREFIX) :])
        return spec.original if spec is not None else None
    parts = model_name.split("/")
    if len(parts) != 2 or not all(parts) or Path(model_name).expanduser().exists():
        return None
    return model_name


def base_model_license(model_name: str, token: str | None = None) -> str | None:
    """The license the base model's own card declares, for a fine-tune's model card; None where it declares
    none or its card cannot be read (never an error: a card without a license is still a card).

    Read from a packaged model's record, a local folder's README.md (a merged/ of an earlier run carries its
    card), the Hub cache, or, when the Hub is reachable, the Hub (one small README.md download).
    """
    try:
        if is_builtin(model_name):
            return None  # built here from random weights: no license to inherit
        if is_packaged(model_name):
            spec = PACKAGED_MODELS.get(model_name[len(PACKAGED_PREFIX) :])
            return spec.license if spec is not None else None
        local = Path(model_name).expanduser()
        if local.is_dir():
            readme = local / "README.md"
        elif hub_model_id(model_name) is None:
            return None
        else:
            cached = try_to_load_from_cache(model_name, "README.md")
            if isinstance(cached, str):
                readme = Path(cached)
            elif hub_reachable():
                readme = Path(hf_hub_download(model_name, "README.md", token=token, etag_timeout=5))
            else:
                return None
        metadata = metadata_load(readme) if readme.is_file() else None
        value = (metadata or {}).get("license")
        return value if isinstance(value, str) and value else None
    except Exception as exc:  # a missing or unreadable card, no network: the license is simply not known
        log.debug("no license read for %s: %s: %s", model_name, type(exc).__name__, exc)
        return None


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
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # a cached copy loads offline
    except Exception:
        pass
    raise _hub_error(name, OSError("hub unreachable"), "model")


def load_tokenizer(config: Config):
    """The tokenizer for ``config.model.model_name``, with a pad token and a chat template guaranteed."""

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
        kind, tokenizer.chat_template = build_fallback_template(tokenizer)
        log.warning(
            "%s has no chat template; using %s, built only on tokens it already has (saved with the exported model)",
            name,
            kind,
        )
    return tokenizer


def _is_special_token(tokenizer, text: str) -> bool:
    """``text`` is one special token of this vocabulary (tokenised whole, never split into pieces)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        return False
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])
    return ids[0] in tokenizer.all_special_ids or bool(added is not None and added.special)


def _plain_template(with_bos: bool) -> str:
    """Plain-text turns; each answer ends with the EOS token, so training teaches the model to stop there.

    The generation prompt ends with a newline, not a space: BPE vocabularies glue a space to the next word, so a
    prompt ending in "Assistant: " would tokenise differently at inference than inside a trained conversation.
    """
    return (
        ("{{- bos_token -}}" if with_bos else "") + "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{{- message['content'] + '\n\n' -}}"
        "{%- elif message['role'] == 'user' -%}"
        "{{- 'User:\n' + message['content'] + '\n\n' -}}"
        "{%- else -%}"
        "{{- 'Assistant:\n' -}}{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
        "{%- if not loop.last -%}{{- '\n\n' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'Assistant:\n' -}}{%- endif -%}"
    )


def build_fallback_template(tokenizer) -> tuple[str, str]:
    """(what it is, template) for a tokenizer without a chat template, using only tokens it already has.

    Adding tokens would need the embedding table resized and the new rows trained and saved; a template on
    existing tokens needs neither. ChatML when ``<|im_start|>`` and ``<|im_end|>`` are special tokens of the
    vocabulary (e.g. base models of instruct families); otherwise plain "User:" / "Assistant:" turns whose answers
    end with the EOS token, starting with BOS when the tokenizer puts one before every text.
    """
    if _is_special_token(tokenizer, "<|im_start|>") and _is_special_token(tokenizer, "<|im_end|>"):
        return "a ChatML template (its <|im_start|>/<|im_end|> tokens are in the vocabulary)", CHATML_TEMPLATE
    if tokenizer.eos_token is None:
        raise ModelError(
            "the tokenizer has no chat template and no EOS token, so no answer could be taught where to stop",
            "field 'model_name'",
            "use a model whose tokenizer has an EOS token or a chat template",
        )
    bos = tokenizer.bos_token_id
    with_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    what = f"a plain-text template (answers end with {tokenizer.eos_token}{', BOS first' if with_bos else ''})"
    return what, _plain_template(with_bos)


def cpu_bf16_kind() -> str:
    """The CPU's native bf16 hardware, which decides the kernels bf16 autocast runs on: 'amx_bf16+avx512_bf16',
    'avx512_bf16', or 'none' (bf16 would be emulated in fp32, slower than fp32 itself)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text(errors="ignore").split())
    except OSError:
        return "none"
    return "+".join(name for name in ("amx_bf16", "avx512_bf16") if name in flags) or "none"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512_BF16 or AMX): bf16 autocast is then faster."""
    return cpu_bf16_kind() != "none"


def gpu_supports_bf16(device: int = 0) -> bool:
    """True when the GPU computes bf16 natively: compute capability 8.0 or newer (Ampere, Hopper, ...).

    ``torch.cuda.is_bf16_supported()`` is not the question to ask: on a T4 (7.5) or a V100 (7.0) it answers
    True because bf16 can be *emulated*, which runs several times slower than fp16 on those cards.
    """
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_precision(precision: Precision) -> str:
    """Turn 'auto' into what this machine runs best; refuse what it cannot run."""
    cuda = torch.cuda.is_available()
    if precision is Precision.AUTO:
        if cuda:
            return "bf16" if gpu_supports_bf16() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision is Precision.FP16 and not cuda:
        raise ConfigError(
            "fp16 mixed precision needs a CUDA GPU", "field 'precision'", "use precision: auto, bf16 or fp32 on CPU"
        )
    if precision is Precision.BF16 and cuda and not gpu_supports_bf16():
        major, minor = torch.cuda.get_device_capability(0)
        raise ConfigError(
            f"this GPU ({torch.cuda.get_device_name(0)}, compute capability {major}.{minor}) has no native bf16 "
            "(it needs 8.0 or newer; bf16 would be emulated, several times slower)",
            "field 'precision'",
            "use precision: fp16 or auto",
        )
    return precision.value


# bf16 autocast moved logits of real models by 1.7% (SmolLM2-135M) and 2.2% (Gemma 3 270M) of their largest value on
# a CPU with AVX512-BF16, and the top-1 token at >= 94% of positions. A CPU whose bf16 kernels are broken gives
# far more; 10% leaves a 4x margin over the worst figure measured.
BF16_CHECK_MAX_RELATIVE = 0.10
BF16_CHECK_MIN_TOP1 = 0.80


@torch.no_grad()
def check_cpu_bf16(model: torch.nn.Module, rows: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Does bf16 autocast on this CPU compute what fp32 computes? One padded batch of real rows, both ways.

    CPUs run bf16 through different kernels (AVX512-BF16 instructions, AMX tiles, or fp32 emulation), and a
    model that trains on one set of kernels is evaluated, merged and exported in fp32. A forward pass of the
    model itself on the run's own rows (padded, so the attention mask is exercised) shows whether the two agree;
    ``ok`` False means train in fp32 instead.
    """
    rows = [r for r in rows if r][:2]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=ids, attention_mask=mask).logits.float()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low = model(input_ids=ids, attention_mask=mask).logits.float()
    finally:
        model.train(was_training)
    keep = mask.bool()
    scale = float(reference[keep].abs().max())
    relative = float((reference - low)[keep].abs().max()) / max(scale, 1e-12)
    top1 = float((reference.argmax(-1) == low.argmax(-1))[keep].float().mean())
    ok = relative <= BF16_CHECK_MAX_RELATIVE and top1 >= BF16_CHECK_MIN_TOP1  # NaN fails both
    return {
        "max_relative_logit_diff": relative,
        "top1_agreement": top1,
        "max_relative_bound": BF16_CHECK_MAX_RELATIVE,
        "min_top1": BF16_CHECK_MIN_TOP1,
        "tokens": int(keep.sum()),
        "ok": ok,
    }


def _compute_dtype(config: Config) -> torch.dtype:
    choice = config.quantization.bnb_4bit_compute_dtype
    resolved = resolve_precision(choice) if choice is not Precision.AUTO else resolve_precision(Precision.AUTO)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolved]


def _check_4bit_shapes(path: str, config: Config) -> None:
    """bitsandbytes' CPU 4-bit kernels need Linear input sizes that are multiples of 64: fail before loading."""
    if torch.cuda.is_available():
        return

    model_cfg = AutoConfig.from_pretrained(
        path, token=config.model.hf_token or None, trust_remote_code=config.model.trust_remote_code
    )
    with torch.device("meta"):
        with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
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
            names = list_repo_files(path, token=config.model.hf_token or None)
        except Exception:
            return False
    return any(n.endswith((".bin", ".pt", ".pth")) for n in names) and not any(
        n.endswith(".safetensors") for n in names
    )


def load_model(config: Config, for_training: bool = True) -> LoadedModel:
    """Load the base model as configured: unquantized, or 4/8-bit with bitsandbytes."""

    name = config.model.model_name
    path = resolve_model_path(name)
    precision = resolve_precision(config.training.precision)
    quant = config.quantization.quantization
    kwargs: dict[str, Any] = {}
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
    model = load_pretrained(config, path, **kwargs)
    if for_training and config.training.gradient_checkpointing:
        model.config.use_cache = False
    return LoadedModel(model=model, path=path, precision=precision)


def load_pretrained(config: Config, path: str, **kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the run's token and code/pickle settings, and errors a user can
    act on (a missing library, pickle-only weights, a model that cannot be found)."""

    name = config.model.model_name
    kwargs = {
        "token": config.model.hf_token or None,
        "trust_remote_code": config.model.trust_remote_code,
        # Pickled weights can execute code on load: safetensors only, unless the user opted in.
        "use_safetensors": None if config.model.allow_pickle_weights else True,
        **kwargs,
    }
    try:
        with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
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


def _unquantized_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the unquantized parameters were loaded in (bf16/fp16 on a GPU under mixed precision, else fp32)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def recast_unquantized(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Put the frozen unquantized parameters of a k-bit model back in the dtype they were loaded in, after PEFT's
    ``prepare_model_for_kbit_training`` made them fp32. A no-op for an fp32 model (CPU, or fp32 training)."""
    if dtype == torch.float32:
        return
    for param in model.parameters():
        if param.dtype == torch.float32 and not param.requires_grad:
            param.data = param.data.to(dtype)


def apply_peft(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """Wrap the model with LoRA adapters (QLoRA on a k-bit base), or leave it whole for a full fine-tune."""
    peft_type = config.peft.peft_type
    if peft_type is PeftType.NONE:
        return model

    if config.quantization.quantization is not Quantization.NONE:
        loaded_dtype = _unquantized_dtype(model)
        # Enables input grads so gradients flow through the frozen k-bit base; it also casts every unquantized
        # parameter (norms, embeddings, head) to fp32, which would run the whole residual stream in fp32.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing
        )
        recast_unquantized(model, loaded_dtype)
    # The adapters' random initialisation happens here, before the Trainer seeds anything: seed it, so the same
    # seed gives the same run.

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
