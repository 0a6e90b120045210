"""Generation with a trained run or a base model: chat replies and evaluation samples.

Models are loaded once and kept in a small cache owned by the caller (the app keeps one per
process), never in module globals.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError

__all__ = ["ModelCache", "load_generation_model", "generate_reply"]


def load_generation_model(source: str, like=None):
    """(model, tokenizer) for a run directory (its merged export) or a model name (builtin, Hub id, local).

    ``like`` is the run's Config when ``source`` is its base model: the base then loads with the run's
    token, trust_remote_code and allow_pickle_weights settings.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from .config import load_config
    from .modeling import is_builtin, load_model, load_tokenizer
    from .runs import load_run_config

    path = Path(source)
    if (path / "config.yaml").is_file():
        config = load_run_config(path)
        merged = path / "merged"
        if not (merged / "config.json").is_file():
            raise ModelError("the run has no merged export yet", str(merged), "finish training or run the torch export")
        tok_cls = PreTrainedTokenizerFast if is_builtin(config.model.model_name) else AutoTokenizer
        tokenizer = tok_cls.from_pretrained(merged)
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    else:
        config = like.replace(model_name=source) if like is not None else load_config(None, [f"model_name={source}"])
        tokenizer = load_tokenizer(config)
        model = load_model(config, for_training=False).model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate_reply(
    model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0
) -> str:
    """One assistant reply to ``messages`` with the tokenizer's chat template; greedy when temperature is 0."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "pad_token_id": tokenizer.pad_token_id}
    if temperature and temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=0.95)
    else:
        kwargs.update(do_sample=False)
    eos = {tokenizer.eos_token_id}
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
        key = str(Path(source).resolve()) if Path(source).exists() else source
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
