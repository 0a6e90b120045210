"""Experiment trackers (report_to) through transformers' own integration callbacks, each writing under the run.

transformers builds one callback per tracker from ``TrainingArguments.report_to``; we configure those callbacks
rather than write to each tracker by hand. Where a callback takes its place from an argument (TensorBoard's
``logging_dir``) it is set on the callback. Where an integration reads environment variables (MLflow, wandb), the
run-directory defaults are set only while it reads them — each callback's ``setup``, and every MLflow event — under
one lock, and the previous environment comes back at once: two runs in one app process, even concurrent ones, each
get their own directory and leave no variable behind. A variable the user set is never overridden. trackio reads
its folder only at import, so its store module is pointed at the run (:func:`_point_trackio_at`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import (
    INTEGRATION_TO_CALLBACK,
    MLflowCallback,
    TensorBoardCallback,
    TrackioCallback,
    WandbCallback,
)

from ..config import Config, ReportTo
from ..errors import ConfigError

__all__ = ["TRACKER_EXTRAS", "check_trackers", "tracker_defaults", "tracker_environment", "attach_trackers"]

# tracker -> (the module it needs, the pyproject extra that installs it)
TRACKER_EXTRAS: dict[ReportTo, tuple[str, str]] = {
    ReportTo.TENSORBOARD: ("tensorboard", "tensorboard"),
    ReportTo.MLFLOW: ("mlflow", "mlflow"),
    ReportTo.TRACKIO: ("trackio", "trackio"),
    ReportTo.WANDB: ("wandb", "wandb"),
}

# One process-wide lock: os.environ is shared by every run of an app process.
_ENV_LOCK = threading.RLock()


def check_trackers(config: Config) -> None:
    """Refuse a tracker whose package is missing, naming the extra, before any work starts."""
    for tracker in config.run.report_to:
        module, extra = TRACKER_EXTRAS[tracker]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"report_to lists {tracker}, but the {module} package is not installed",
                "field 'report_to'",
                f"pip install 'autotuning[{extra}]' (or drop {tracker} from report_to)",
            )


def tracker_defaults(config: Config, run_dir: Path) -> dict[str, str]:
    """The environment each chosen tracker gets unless the user set the variable: everything under ``run_dir``."""
    chosen = set(config.run.report_to)
    env: dict[str, str] = {}
    if ReportTo.MLFLOW in chosen:
        if "MLFLOW_TRACKING_URI" not in os.environ:
            # A file store: mlflow-skinny has no SQL backend. mlflow 3 keeps file stores behind an opt-in flag.
            env["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").resolve().as_uri()
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if ReportTo.WANDB in chosen:
        env["WANDB_MODE"] = "offline"  # `wandb sync <run>/wandb/offline-run-*` uploads it later
        env["WANDB_DIR"] = str(run_dir.resolve())
    if ReportTo.TRACKIO in chosen:
        env["TRACKIO_DIR"] = str((run_dir / "trackio").resolve())
    return env


@contextlib.contextmanager
def tracker_environment(config: Config, run_dir: Path) -> Iterator[None]:
    """The tracker defaults in os.environ for the duration of the block only (variables the user set stay)."""
    defaults = tracker_defaults(config, run_dir)
    with _ENV_LOCK:
        added = {k: v for k, v in defaults.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)


def tracker_callbacks(trainer) -> list[TrainerCallback]:
    """The integration callbacks transformers added for report_to."""
    classes = tuple(INTEGRATION_TO_CALLBACK[str(t)] for t in ReportTo if t is not ReportTo.NONE)
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, classes)]


def attach_trackers(trainer, config: Config, run_dir: Path) -> None:
    """Point the trackers' callbacks at the run directory, after ours, and log the config through them.

    Order matters: the Trainer puts report_to callbacks before the ones it is given, so they would see each log
    before MetricsCallback adds tokens/s and ETA to it. Moving them to the end lets them see those figures.
    """
    integrations = tracker_callbacks(trainer)
    if not integrations:
        return
    for cb in integrations:
        trainer.pop_callback(cb)
        trainer.add_callback(cb)
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:  # TENSORBOARD_LOGGING_DIR unset
            cb.logging_dir = str(run_dir / "tensorboard")
        _scope_events(cb, config, run_dir)
    trainer.add_callback(_ConfigToTrackers(config, integrations))


# Where the integration reads its environment: setup for all; every event for MLflow, whose fluent API looks up the
# tracking URI (process-wide) and builds its store (which checks MLFLOW_ALLOW_FILE_STORE) on each call.
_SCOPED_EVENTS = {MLflowCallback: ("setup", "on_train_begin", "on_log", "on_save", "on_train_end")}


def _scope_events(cb, config: Config, run_dir: Path) -> None:
    names = next((events for cls, events in _SCOPED_EVENTS.items() if isinstance(cb, cls)), ("setup",))
    for name in names:
        if hasattr(cb, name):
            setattr(cb, name, _scoped(cb, getattr(cb, name), config, run_dir))


def _scoped(cb, method, config: Config, run_dir: Path):
    """The callback's method inside this run's tracker environment (held under the lock for the call)."""

    def scoped(*args, **kwargs):
        with tracker_environment(config, run_dir):
            if isinstance(cb, MLflowCallback):
                # mlflow keeps one tracking URI per process and the callback keeps whatever is set: set this run's
                # on each call, or a second run in the same process would write into the first one's store.
                cb._ml_flow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
            if isinstance(cb, TrackioCallback):
                _point_trackio_at(Path(os.environ["TRACKIO_DIR"]))
            return method(*args, **kwargs)

    return scoped


def _point_trackio_at(store: Path) -> None:
    """trackio reads TRACKIO_DIR once, at import, and TRL imports it at every checkpoint of any run (for the model
    card's link) — so by now it is usually fixed. Its sqlite store takes the folder from these two module globals
    (trackio 0.43): set them for this run. They stay until the next trackio run (trackio's writer thread uses them
    until the run finishes): trackio runs of one process run one at a time, like trackio's own current run."""
    import trackio.sqlite_storage
    import trackio.utils

    store.mkdir(parents=True, exist_ok=True)
    trackio.utils.TRACKIO_DIR = trackio.sqlite_storage.TRACKIO_DIR = store


class _ConfigToTrackers(TrainerCallback):
    """Our config (token left out) as each tracker's params/hparams, through the callbacks' own handles."""

    def __init__(self, config: Config, integrations: list[TrainerCallback]):
        self.flat = config.to_flat_dict(redact=True)
        self.yaml = config.to_yaml()
        self.integrations = integrations

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        params = {f"autotuning/{k}": _param_text(v) for k, v in self.flat.items()}
        for cb in self.integrations:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                cb.tb_writer.add_text("autotuning_config", "```yaml\n" + self.yaml + "```")
                cb.tb_writer.flush()
            elif isinstance(cb, MLflowCallback) and cb._ml_flow.active_run() is not None:
                items = list(params.items())
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                    cb._ml_flow.log_params(dict(items[i : i + 100]))
            elif isinstance(cb, WandbCallback) and cb._wandb.run is not None:
                cb._wandb.config.update({"autotuning": self.flat}, allow_val_change=True)
            elif isinstance(cb, TrackioCallback) and getattr(cb, "_initialized", False):
                cb._trackio.config.update({"autotuning": self.flat}, allow_val_change=True)

    def on_train_end(self, args, state, control, **kwargs):
        # WandbCallback leaves its run open (wandb closes it at exit): in an app process the next run would log
        # into this one. Close it here, after every integration's own on_train_end.
        for cb in self.integrations:
            if isinstance(cb, WandbCallback) and state.is_world_process_zero and cb._wandb.run is not None:
                cb._wandb.finish()


def _param_text(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text[:250]  # MLflow's limit on a param value
