"""A sweep: a few trials of one config, each a normal run in the sweep's folder, trained one after another.

A sweep folder holds::

    sweep.yaml         the sweep's config (token never written)
    sweep.json         the trials (their options, status, the metric) and the best one
    .lock              held by the job running the sweep
    trial-01/ ...      one run directory per trial

The loop here knows nothing of training: the CLI and the pipeline hand it ``run_trial`` (train one config,
return how its run ended). A stopped trial ends the sweep; resuming continues that trial from its checkpoint and
then the trials not run yet. A trial that fails is recorded and the sweep goes on: one bad combination (out of
memory at the largest rank) should not cost the others.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, load_config, lower_is_better
from ..errors import ConfigError
from .checkpoints import last_checkpoint
from .directory import RunDir, clear_run_dir, write_json_atomic
from .lock import LOCK_FILE, Operation, RunLock
from .status import RunStatus

__all__ = [
    "Trial",
    "SweepDir",
    "is_sweep",
    "plan_trials",
    "prepare_sweep",
    "run_sweep",
    "best_trial",
    "sweep_trial_dirs",
    "load_sweep_config",
]

SWEEP_JSON = "sweep.json"
SWEEP_YAML = "sweep.yaml"


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / SWEEP_JSON).is_file()


@dataclass
class Trial:
    name: str  # trial-01, ...
    params: dict[str, Any]  # the options this trial sets
    config: Config  # the sweep's config with those options, in its own run directory, without a sweep

    @property
    def path(self) -> Path:
        return Path(self.config.run.output_dir)


class SweepDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    record_path = property(lambda self: self.path / SWEEP_JSON)
    config_path = property(lambda self: self.path / SWEEP_YAML)

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def write(self, record: dict[str, Any]) -> None:
        record["updated_at"] = time.time()
        write_json_atomic(self.record_path, record)

    def trial_dirs(self) -> list[Path]:
        return [Path(t["path"]) for t in self.read().get("trials", [])]


def sweep_trial_dirs(path: str | Path) -> list[Path]:
    """The run directories of a sweep's trials, in order (those that exist)."""
    return [p for p in SweepDir(path).trial_dirs() if (p / "run.json").is_file()]


def plan_trials(config: Config) -> list[Trial]:
    """Every trial's config, built (and so checked) before the first one trains."""
    root = Path(config.run.output_dir)
    points = config.search.points(config.training.seed)
    width = max(2, len(str(len(points))))
    trials = []
    for i, params in enumerate(points, start=1):
        name = f"trial-{i:0{width}d}"
        try:
            trial_config = config.replace(**params, sweep={}, output_dir=str(root / name), resume=False)
        except ConfigError as err:
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            raise ConfigError(err.what, f"field 'sweep', {name} ({shown}), {err.where}", err.fix) from None
        trials.append(Trial(name, params, trial_config))
    return trials


def best_trial(trials: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The finished trial with the best ``metric`` (lowest for a loss or perplexity), or None."""
    scored = [t for t in trials if t.get("status") == RunStatus.FINISHED.value and _number(t.get("value"))]
    if not scored:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(scored, key=lambda t: t["value"])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def prepare_sweep(config: Config) -> list[Trial]:
    """Check a sweep before it starts (every trial's config, the sweep folder) and return its trials.

    The pipeline calls it before starting the sweep's thread, so a bad option is the Start button's error.
    """
    trials = plan_trials(config)
    _open(config)
    return trials


def _open(config: Config) -> SweepDir:
    """Check the sweep folder as a run's is checked: a new sweep needs an empty one (or overwrite_output_dir)."""
    raw = config.run.output_dir
    where = f"field 'output_dir' = {raw}"
    sweep = SweepDir(Path(raw).expanduser())
    path = sweep.path
    if path.exists() and not path.is_dir():
        raise ConfigError("output_dir is a file, not a directory", where, "choose a directory path")
    if config.training.resume:
        if not sweep.record_path.is_file():
            raise ConfigError(
                "there is no sweep to resume in output_dir", where, "point output_dir at an earlier sweep's folder"
            )
        return sweep
    if path.is_dir() and any(child.name != LOCK_FILE for child in path.iterdir()):
        if not config.run.overwrite_output_dir:
            raise ConfigError(
                "output_dir already holds files",
                where,
                "pass --resume to continue that sweep, set overwrite_output_dir: true to replace it, or pick a new "
                "output_dir",
            )
        if not sweep.record_path.is_file():
            raise ConfigError(
                "output_dir holds files that are not a sweep; refusing to overwrite them",
                where,
                "pick an empty or new output_dir",
            )
    path.mkdir(parents=True, exist_ok=True)
    return sweep


def run_sweep(
    config: Config,
    run_trial: Callable[[Config], RunStatus],
    stopped: Callable[[], bool] = lambda: False,
    on_trial: Callable[[Trial, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) the sweep ``config`` describes; returns sweep.json's record.

    ``run_trial`` trains one trial's config and returns how its run ended; ``stopped`` says whether the user asked
    to stop between trials. ``on_trial(trial, number, total)`` is told before each trial starts.
    """
    trials = plan_trials(config)
    sweep = _open(config)
    resume = config.training.resume
    with RunLock(sweep.path, Operation.TRAIN).acquire():
        previous = sweep.read() if resume else {}
        if not resume:
            clear_run_dir(sweep.path)
        config.replace(resume=False, overwrite_output_dir=False).save_yaml(sweep.config_path)
        done = {t["name"]: t for t in previous.get("trials", [])}
        s = config.search
        record: dict[str, Any] = {
            "kind": "sweep",
            "status": RunStatus.RUNNING.value,
            "method": s.sweep_method.value,
            "metric": s.sweep_metric,
            "space": s.sweep,
            "started_at": previous.get("started_at") or time.time(),
            "trials": [
                {
                    "name": t.name,
                    "path": str(t.path),
                    "params": t.params,
                    "status": done.get(t.name, {}).get("status", RunStatus.QUEUED.value),
                    "value": done.get(t.name, {}).get("value"),
                }
                for t in trials
            ],
            "best": None,
        }
        sweep.write(record)
        status = RunStatus.FINISHED
        for number, (trial, entry) in enumerate(zip(trials, record["trials"]), start=1):
            if entry["status"] == RunStatus.FINISHED.value:
                continue
            if stopped():
                status = RunStatus.STOPPED
                break
            if on_trial is not None:
                on_trial(trial, number, len(trials))
            entry["status"] = RunStatus.RUNNING.value
            sweep.write(record)
            ended = run_trial(_trial_start(trial))
            run = RunDir(trial.path).read()
            entry["status"] = ended.value
            entry["value"] = (run.get("eval_results") or {}).get(s.sweep_metric)
            if ended is RunStatus.FAILED:
                entry["error"] = run.get("error", "")
            best = best_trial(record["trials"], s.sweep_metric)
            record["best"] = {"name": best["name"], "value": best["value"]} if best else None
            sweep.write(record)
            if ended in (RunStatus.STOPPED, RunStatus.INTERRUPTED):
                status = RunStatus.STOPPED
                break
        record["status"] = status.value
        if status is RunStatus.FINISHED:
            record["finished_at"] = time.time()
        sweep.write(record)
        return record


def _trial_start(trial: Trial) -> Config:
    """A trial's config for this attempt: resumed from its checkpoint when an earlier attempt left one, else fresh."""
    run = RunDir(trial.path)
    if run.exists() and last_checkpoint(run.checkpoints) is not None:
        return trial.config.replace(resume=True)
    if trial.path.is_dir() and any(trial.path.iterdir()):
        return trial.config.replace(overwrite_output_dir=True)  # a failed start left files, nothing to resume
    return trial.config


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a sweep was started with (for resuming it)."""
    return load_config(SweepDir(path).config_path, overrides)
