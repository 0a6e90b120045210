"""TensorFlow export through keras-hub: a SavedModel and a .keras file, reloaded and checked.

transformers 5 has no TensorFlow model classes, so the merged Hugging Face directory is converted by
keras-hub (``CausalLM.from_preset(dir)`` maps Llama, Mistral, Qwen2 and GPT-2 checkpoints onto its
own Keras models), exported with ``export(..., format="tf_saved_model")`` and reloaded with
``tf.saved_model.load``; its logits and greedy tokens are compared with the torch model's on the parity
prompt (:mod:`.verify`). TensorFlow is imported only here, so the app starts fast and works without it.

keras-hub 0.32's Llama converter does not carry ``rms_norm_eps`` over: every Llama came out with
keras-hub's default 1e-6, while SmolLM2 and the Llama 3 family use 1e-5. That alone moved SmolLM2's
logits by 0.019-0.031 (8e-4 of their scale). The backbone is therefore built with the checkpoint's own
epsilon for every architecture whose keras-hub backbone takes one.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..concurrency import MODEL_LOADING
from ..errors import ConfigError, ExportError
from .verify import GREEDY_TOKENS, hf_reference, install_export, judge, parity_ids, work_dir

__all__ = ["SUPPORTED_TF_ARCHITECTURES", "check_tensorflow_supported", "export_tensorflow"]

log = logging.getLogger(__name__)

# HF model_type values keras-hub converts (and that we verify in tests: llama, qwen2, gpt2, and gemma3_text on the
# real Gemma 3 270M: rel 3.1e-6 over 93 positions, 1.7e-5 past its 512-token sliding window).
SUPPORTED_TF_ARCHITECTURES = ("gemma3_text", "gpt2", "llama", "mistral", "qwen2")
# model_type -> the HF config field holding the norm epsilon, for backbones that take ``layer_norm_epsilon``
# (keras-hub's GPT-2 backbone has none: its 1e-5 is GPT-2's own default).
_EPSILON_FIELD = {"llama": "rms_norm_eps", "mistral": "rms_norm_eps", "qwen2": "rms_norm_eps"}


def check_tensorflow_supported(model_type: str, where: str = "field 'save_format'") -> None:
    if model_type not in SUPPORTED_TF_ARCHITECTURES:
        raise ConfigError(
            f"TensorFlow export does not support the '{model_type}' architecture",
            where,
            f"supported: {', '.join(SUPPORTED_TF_ARCHITECTURES)}; remove tensorflow from save_format for this model",
        )


def _import_keras_hub():
    backend = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        raise ExportError(
            f"KERAS_BACKEND is '{backend}'",
            "environment",
            "unset it or set KERAS_BACKEND=tensorflow for TensorFlow export",
        )
    try:
        import keras_hub
        import tensorflow as tf
    except ImportError as exc:
        raise ConfigError(
            f"TensorFlow export needs tensorflow-cpu, keras and keras-hub ({exc.name} is missing)",
            "field 'save_format'",
            "pip install -r requirements.txt",
        ) from None
    return keras_hub, tf


def _load_causal_lm(keras_hub, merged, hf_config):
    """keras-hub's CausalLM for the merged checkpoint, with the checkpoint's norm epsilon (see above)."""
    backbone_kwargs: dict[str, Any] = {"dtype": "float32"}
    field = _EPSILON_FIELD.get(hf_config.model_type)
    if field and getattr(hf_config, field, None) is not None:
        backbone_kwargs["layer_norm_epsilon"] = float(getattr(hf_config, field))
    backbone = keras_hub.models.Backbone.from_preset(str(merged), **backbone_kwargs)
    # preprocessor=None: we keep the HF tokenizer (saved next to the merged model); keras-hub's GPT-2
    # preprocessor would want vocab.json + merges.txt files.
    return keras_hub.models.CausalLM.from_preset(str(merged), preprocessor=None, backbone=backbone)


def _saved_model_runner(tf, path: Path):
    """logits [T, V] for token ids [1, T], through the SavedModel's serving signature."""
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]

    def run(ids: np.ndarray) -> np.ndarray:
        ids = ids.astype("int32")
        out = serve(token_ids=tf.constant(ids), padding_mask=tf.constant(np.ones_like(ids)))
        return np.asarray(next(iter(out.values())))[0]

    return run


def _greedy(run, ids: np.ndarray, steps: int = GREEDY_TOKENS) -> list[int]:
    """Greedy continuation without a cache: the signature takes whole sequences (16 short forwards)."""
    seq = ids.copy()
    tokens: list[int] = []
    for _ in range(steps):
        token = int(run(seq)[-1].argmax())
        tokens.append(token)
        seq = np.concatenate([seq, [[token]]], axis=1)
    return tokens


def export_tensorflow(run, tokenizer=None) -> dict[str, Any]:
    """Write ``tensorflow/saved_model/`` and ``tensorflow/model.keras`` from ``merged/``, checked against it."""

    merged = run.merged
    if not (merged / "config.json").is_file():
        raise ExportError(
            "TensorFlow export starts from the merged torch export, which is missing", str(merged), "export torch first"
        )
    hf_config = AutoConfig.from_pretrained(merged)
    check_tensorflow_supported(hf_config.model_type)
    keras_hub, tf = _import_keras_hub()
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(merged)
    ids = parity_ids(tokenizer)
    # The reference first, then freed: one model in memory at a time.
    with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
        reference_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    reference = hf_reference(reference_model, ids, "merged/ (fp32)")
    del reference_model
    final_dir = run.path / "tensorflow"
    tmp_dir = work_dir(run.path, "tensorflow")
    try:
        lm = _load_causal_lm(keras_hub, merged, hf_config)
        keras_class = type(lm).__name__
        epsilon = getattr(lm.backbone, "layer_norm_epsilon", None)
        lm.export(str(tmp_dir / "saved_model"), format="tf_saved_model")
        lm.save(str(tmp_dir / "model.keras"))
        del lm
        # Independent reader: plain TensorFlow, no Keras objects.
        runner = _saved_model_runner(tf, tmp_dir / "saved_model")
        np_ids = ids.numpy()
        figures = judge("tensorflow", "float32", reference, torch.from_numpy(runner(np_ids)), _greedy(runner, np_ids))
        where = install_export(tmp_dir, final_dir, figures, fmt="tensorflow", run_dir=run.path, primary="saved_model")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    size = sum(p.stat().st_size for p in where.rglob("*") if p.is_file())
    return {
        "path": str(where),
        **figures,
        "saved_model": str(where / "saved_model"),
        "keras_file": str(where / "model.keras"),
        "keras_class": keras_class,
        "layer_norm_epsilon": epsilon,
        "bytes": size,
        "signature": "serving_default(token_ids int32 [batch, seq], padding_mask int32 [batch, seq]) -> logits",
    }
