"""TensorFlow export through keras-hub: a SavedModel and a .keras file, reloaded and checked.

transformers 5 has no TensorFlow model classes, so the merged Hugging Face directory is converted by
keras-hub (``CausalLM.from_preset(dir)`` maps Llama, Mistral, Qwen2 and GPT-2 checkpoints onto its
own Keras models), exported with ``export(..., format="tf_saved_model")`` and reloaded with
``tf.saved_model.load``; its logits must match the torch model's within 1e-4. TensorFlow is imported
only here, so the app starts fast and works without it.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ExportError

__all__ = ["SUPPORTED_TF_ARCHITECTURES", "check_tensorflow_supported", "export_tensorflow"]

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
# HF model_type values keras-hub converts (and that we verify in tests: llama, qwen2, gpt2).
SUPPORTED_TF_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2")


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


def export_tensorflow(run) -> dict[str, Any]:
    """Write ``tensorflow/saved_model/`` and ``tensorflow/model.keras`` from the verified ``merged/``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    merged = run.merged
    if not (merged / "config.json").is_file():
        raise ExportError(
            "TensorFlow export starts from the merged torch export, which is missing", str(merged), "export torch first"
        )
    model_type = AutoConfig.from_pretrained(merged).model_type
    check_tensorflow_supported(model_type)
    keras_hub, tf = _import_keras_hub()
    final_dir = run.path / "tensorflow"
    tmp_dir = run.path / ".tensorflow.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        # preprocessor=None: we keep the HF tokenizer (saved next to the merged model); keras-hub's GPT-2
        # preprocessor would want vocab.json + merges.txt files.
        lm = keras_hub.models.CausalLM.from_preset(str(merged), preprocessor=None)
        lm.export(str(tmp_dir / "saved_model"), format="tf_saved_model")
        lm.save(str(tmp_dir / "model.keras"))
        # Independent reader: plain TensorFlow, no Keras objects.
        loaded = tf.saved_model.load(str(tmp_dir / "saved_model"))
        serve = loaded.signatures["serving_default"]
        ids = np.array([[3 + (i * 37) % 500 for i in range(24)]], dtype="int32")
        out = serve(token_ids=tf.constant(ids), padding_mask=tf.constant(np.ones_like(ids)))
        tf_logits = np.asarray(next(iter(out.values())))
        reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        with torch.no_grad():
            ref_logits = reference(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
        diff = float(np.abs(tf_logits - ref_logits).max())
        if not diff <= TOLERANCE:
            raise ExportError(
                f"the SavedModel's logits differ from the torch model's by {diff:.3g} (> {TOLERANCE})",
                str(tmp_dir),
                "report this as a bug; the torch export is unaffected",
            )
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    size = sum(p.stat().st_size for p in final_dir.rglob("*") if p.is_file())
    return {
        "path": str(final_dir),
        "saved_model": str(final_dir / "saved_model"),
        "keras_file": str(final_dir / "model.keras"),
        "keras_class": type(lm).__name__,
        "max_abs_logit_diff": diff,
        "tolerance": TOLERANCE,
        "bytes": size,
        "signature": "serving_default(token_ids int32 [batch, seq], padding_mask int32 [batch, seq]) -> logits",
    }
