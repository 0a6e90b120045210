"""Generation with a trained run or a base model: chat replies and evaluation samples.

Models are loaded once and kept in a small cache owned by the caller (the app keeps one per
process), never in module globals.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .concurrency import MODEL_LOADING
from .config import Quantization, load_config
from .data.encoding import end_of_turn_token_ids
from .errors import ModelError
from .modeling import gpu_supports_bf16, is_builtin, load_pretrained, load_tokenizer, resolve_model_path
from .runs import load_run_config

__all__ = ["ModelCache", "load_generation_model", "generate_reply"]


def _placement(config) -> dict[str, Any]:
    """How a run's models load for scoring, generation and chat: the same for the base and the fine-tuned model.

    A run trained on a 4/8-bit base loads both models with that quantization (it is what fits the user's
    memory, and scoring one 4-bit and the other at full precision would credit the fine-tune with the
    quantization error). Otherwise both load unquantized: fp32 on a CPU, on the GPU when there is one, in
    bf16 where the GPU has native bf16, else fp32 (fp16 overflows models trained in bf16, such as Gemma).
    """

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    cuda = torch.cuda.is_available()
    if cuda:
        kwargs["device_map"] = {"": 0}
        if gpu_supports_bf16():
            kwargs["dtype"] = torch.bfloat16
    quant = config.quantization.quantization if config is not None else Quantization.NONE
    if quant is Quantization.INT4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
    elif quant is Quantization.INT8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return kwargs


def load_generation_model(source: str, like=None):
    """(model, tokenizer) for a run directory (its merged export) or a model name (builtin, Hub id, local).

    ``like`` is the run's Config when ``source`` is its base model: the base then loads with the run's
    token, trust_remote_code and allow_pickle_weights settings, and exactly as the run's merged model loads
    (see :func:`_placement`), so base and fine-tuned are compared at the same precision on the same device.
    """

    path = Path(source)
    if (path / "config.yaml").is_file():
        config = load_run_config(path)
        merged = path / "merged"
        if not (merged / "config.json").is_file():
            raise ModelError("the run has no merged export yet", str(merged), "finish training or run the torch export")
        tok_cls = PreTrainedTokenizerFast if is_builtin(config.model.model_name) else AutoTokenizer
        tokenizer = tok_cls.from_pretrained(merged)
        with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
            model = AutoModelForCausalLM.from_pretrained(merged, use_safetensors=True, **_placement(config))
    else:
        config = like.replace(model_name=source) if like is not None else load_config(None, [f"model_name={source}"])
        tokenizer = load_tokenizer(config)
        model = load_pretrained(config, resolve_model_path(config.model.model_name), **_placement(like))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


# Sampling settings of every reply with temperature > 0. top_k is transformers' default, which generate() applied
# when it sampled for us; a model whose generation_config sets its own keeps it.
TOP_P = 0.95
DEFAULT_TOP_K = 50


class _SampleWith(LogitsProcessor):
    """Draws the next token from the (already warped) scores with a generator of its own, then leaves only that
    token possible, so that greedy decoding picks it.

    ``generate(do_sample=True)`` draws with ``torch.multinomial`` from the process-wide RNG, which a training run in
    another thread of the same process draws its dropout masks from: a chat reply would change that run's losses.
    transformers' generate() takes no generator, hence this processor.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def _sampling_processors(model, temperature: float, seed: int, device: torch.device) -> LogitsProcessorList:
    """Temperature, top-k and top-p (the warpers generate() applies when it samples), then our sampler."""
    top_k = getattr(model.generation_config, "top_k", None)
    top_k = DEFAULT_TOP_K if top_k is None else int(top_k)
    processors = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k=top_k))
    processors.append(TopPLogitsWarper(top_p=TOP_P))
    processors.append(_SampleWith(torch.Generator(device=device).manual_seed(int(seed))))
    return processors


@torch.no_grad()
def generate_reply(
    model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0
) -> str:
    """One assistant reply to ``messages`` with the tokenizer's chat template; greedy when temperature is 0.

    With temperature > 0 the reply is sampled (top-p 0.95) from a generator seeded with ``seed``: the same seed gives
    the same reply, and the process-wide RNG, which a training job in another thread may be drawing from, is never
    touched.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "pad_token_id": tokenizer.pad_token_id,
        # Always greedy for generate(): when sampling, our processor has already left one token possible.
        "do_sample": False,
    }
    if temperature and temperature > 0:
        kwargs["logits_processor"] = _sampling_processors(model, temperature, seed, device)
    # Stop where training taught the model to stop (the template's end-of-turn token), and on the EOS ids.
    eos = {tokenizer.eos_token_id, *end_of_turn_token_ids(tokenizer)}
    if getattr(model.generation_config, "eos_token_id", None) is not None:
        gen_eos = model.generation_config.eos_token_id
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    kwargs["eos_token_id"] = sorted(e for e in eos if e is not None)
    out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


class ModelCache:
    """Keeps the last few loaded (model, tokenizer) pairs; thread-safe."""

    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str, fresh: bool = False, like=None):
        """The pair for ``source``, loaded once. Loaded with a token, a model is cached for that token only: one
        visitor's private model is never handed to another session of a shared app."""
        key = str(Path(source).resolve()) if Path(source).exists() else source
        token = getattr(getattr(like, "model", None), "hf_token", "") or ""
        if token:
            key += "#" + hashlib.sha256(token.encode()).hexdigest()[:16]
        with self._lock:
            if not fresh and key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = load_generation_model(source, like)
        with self._lock:
            self._items[key] = loaded
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return loaded
