"""The out-of-memory policy: train, and on OOM retry the same training a cheaper way, as long as one is left.

First halve the micro-batch and double gradient accumulation (same effective batch, same curve up to
noise); at micro-batch 1, turn gradient checkpointing on (recompute activations, ~30% slower). The retry
continues from the last checkpoint (steps before the error changed the weights in place), or from freshly
loaded weights when there is none.

The decision is made inside the ``except`` block; the freeing and reloading happen after leaving it, when
the traceback, and the trainer frames and activations it keeps alive, are gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import release_memory
from accelerate.utils.memory import should_reduce_batch_size

from ..config import Config
from ..errors import ConfigError
from ..runs import MetricsSink, checkpoint_step, last_checkpoint

__all__ = ["is_out_of_memory", "oom_fallback", "train_with_oom_policy", "TrainedState"]

log = logging.getLogger("autotuning")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS/XPU OOM, or the CPU allocator giving up (which PyTorch raises as a plain RuntimeError)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, Exception) and should_reduce_batch_size(exc)
    )


def oom_fallback(config: Config) -> tuple[Config, str] | None:
    """The next, cheaper way to run the same training after an out-of-memory error, or None if none is left."""
    t = config.training
    if t.per_device_train_batch_size > 1:
        batch = t.per_device_train_batch_size // 2
        accumulation = t.gradient_accumulation_steps * t.per_device_train_batch_size // batch
        changed = config.replace(
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            per_device_eval_batch_size=max(1, t.per_device_eval_batch_size // 2),
        )
        return changed, (
            f"per_device_train_batch_size {t.per_device_train_batch_size} -> {batch}, gradient_accumulation_steps "
            f"{t.gradient_accumulation_steps} -> {accumulation} (effective batch unchanged), "
            f"per_device_eval_batch_size {t.per_device_eval_batch_size} -> {changed.training.per_device_eval_batch_size}"
        )
    if not t.gradient_checkpointing:
        return config.replace(gradient_checkpointing=True), "gradient_checkpointing false -> true"
    return None


@dataclass
class TrainedState:
    trainer: Any
    config: Config  # the settings that fitted (differs from the run's config after a retry)
    model: Any
    retries: list[dict[str, Any]]


def train_with_oom_policy(
    config: Config,
    model,
    *,
    build_trainer: Callable[[Config, Any], Any],
    reload_model: Callable[[Config], Any],
    checkpoints: Path,
    resume_from: Path | None,
    sink: MetricsSink,
    may_retry: bool,
    on_retry: Callable[[Config, list[dict[str, Any]]], None] = lambda config, retries: None,
) -> TrainedState:
    """Train; on out of memory, fall back (see the module docstring) and go again until it fits or nothing is left.

    ``may_retry`` is False for one rank of a multi-process run: one rank cannot change the batch size alone,
    so it fails with the advice instead.
    """
    attempt, retries = config, []
    while True:
        trainer = build_trainer(attempt, model)
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            return TrainedState(trainer, attempt, model, retries)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            fallback = oom_fallback(attempt) if may_retry else None
            if fallback is None:
                raise ConfigError(
                    f"out of memory during training ({str(exc).splitlines()[0][:200]})",
                    "fields 'per_device_train_batch_size'/'max_seq_length'",
                    "run 'python -m autotuning estimate' and apply its suggestion (4-bit, shorter "
                    "sequences, a smaller model)",
                ) from None
            failed_step = trainer.state.global_step
        # Out of the except block: the traceback no longer pins the failed step's frames and activations.
        attempt, change = fallback
        (trainer,) = release_memory(trainer)
        resume_from = last_checkpoint(checkpoints)
        restart_step = checkpoint_step(resume_from) if resume_from else 0
        if resume_from is None:
            (model,) = release_memory(model)
            model = reload_model(attempt)
        sink.truncate(restart_step)
        message = f"out of memory at step {failed_step}; retrying from step {restart_step} with {change}"
        log.warning(message)
        retry = {"step": failed_step, "restart_step": restart_step, "change": change}
        retries.append(retry)
        sink.emit({"type": "notice", "kind": "oom_retry", "time": time.time(), "message": message, **retry})
        on_retry(attempt, retries)
