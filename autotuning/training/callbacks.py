"""Trainer callbacks: metric events for live charts, and a cooperative stop that still saves."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from ..distributed import stop_requested_everywhere
from ..runs.events import MetricsSink

__all__ = ["MetricsCallback", "StopCallback", "FinalCheckpointCallback"]

# Our own figures added to the Trainer's log dict, for the experiment trackers (report_to) to record too.
_FIGURES_FOR_TRACKERS = ("tokens_per_second", "tokens_seen", "eta_s", "elapsed_s")
_TRAIN_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}
# What TRL's preference trainers log (DPO, ORPO, CPO/SimPO; KTO has no accuracy), under our event names.
_PREFERENCE_KEYS = {
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
}


class MetricsCallback(TrainerCallback):
    """Turns every ``on_log`` into a metric event: step, epoch, loss / eval loss, lr, grad norm, tokens/s, ETA."""

    def __init__(self, sink: MetricsSink):
        self.sink = sink
        self._start_time = 0.0
        self._start_step = 0
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = self._last_time = time.monotonic()
        self._start_step = state.global_step  # > 0 when resuming
        self._last_tokens = state.num_input_tokens_seen or 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        shared = logs if logs is not None else {}
        logs = dict(shared)
        now = time.monotonic()
        step = state.global_step
        event: dict = {"step": step, "epoch": round(float(state.epoch or 0.0), 4), "time": time.time()}
        if "eval_loss" in logs:
            event["type"] = "eval"
            event["eval_loss"] = float(logs["eval_loss"])
            event["eval_perplexity"] = math.exp(min(float(logs["eval_loss"]), 50.0))
            if logs.get("eval_accuracy") is not None:  # best_metric: accuracy (the answer tokens predicted right)
                event["eval_accuracy"] = float(logs["eval_accuracy"])
            event.update(_preference_values(logs, "eval_"))
        elif "loss" in logs:
            event["type"] = "train"
            for key, name in _TRAIN_KEYS.items():
                if key in logs and logs[key] is not None:
                    event[name] = float(logs[key])
            event.update(_preference_values(logs, ""))
            tokens = state.num_input_tokens_seen or 0
            if now > self._last_time and tokens >= self._last_tokens:
                event["tokens_per_second"] = round((tokens - self._last_tokens) / (now - self._last_time), 1)
            event["tokens_seen"] = tokens
            self._last_time, self._last_tokens = now, tokens
        elif "train_runtime" in logs:
            event["type"] = "summary"
            event.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
        else:
            return
        elapsed = now - self._start_time
        event["elapsed_s"] = round(elapsed, 2)
        done = step - self._start_step
        if state.max_steps and done > 0:
            event["eta_s"] = round(max(0.0, (state.max_steps - step) * elapsed / done), 1)
        event["max_steps"] = state.max_steps
        self.sink.emit(event)
        # The trackers' callbacks run after this one (training/trackers.py) on the same dict: they get our figures.
        shared.update({k: event[k] for k in _FIGURES_FOR_TRACKERS if k in event and k not in shared})


def _preference_values(logs: dict, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}{name}": float(logs[prefix + key])
        for key, name in _PREFERENCE_KEYS.items()
        if logs.get(prefix + key) is not None
    }


class StopCallback(TrainerCallback):
    """Ends training at the next step boundary when ``stop_event`` is set, saving a checkpoint first.

    In a multi-process run the request may also come as ``stop_file`` (written by the launching parent);
    the ranks agree with one all-reduce per step so that all of them stop, and save, at the same step.
    """

    def __init__(self, stop_event: threading.Event, stop_file: Path | None = None):
        self.stop_event = stop_event
        self.stop_file = stop_file
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        local = self.stop_event.is_set() or (self.stop_file is not None and self.stop_file.exists())
        if self.stop_file is not None:
            local = stop_requested_everywhere(local, args.device)
        if local:
            control.should_training_stop = True
            control.should_save = True
            self.stopped_at = state.global_step
        return control


class FinalCheckpointCallback(TrainerCallback):
    """Always checkpoint the last step, so a finished run can be resumed/extended and nothing is lost."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control
