"""Where a run lives on disk (its paths), its run.json record through one writer, and the list of runs."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..errors import ConfigError
from .lock import LOCK_FILE, lock_owner
from .status import RunStatus

__all__ = [
    "RunDir",
    "resolve_run_dir",
    "library_versions",
    "default_run_name",
    "write_json_atomic",
    "load_run_config",
    "base_run_model",
    "list_runs",
    "clear_run_dir",
]

_LOCK = threading.Lock()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def library_versions() -> dict[str, str]:
    names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "evaluate"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def default_run_name(config: Config) -> str:
    short = config.data.fine_tuning_type.value.split("_")[0]
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{short}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    run_json = property(lambda self: self.path / "run.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    log_path = property(lambda self: self.path / "train.log")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")
    merged = property(lambda self: self.path / "merged")

    def exists(self) -> bool:
        return self.run_json.is_file()

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge fields into run.json (atomic replace; safe to read concurrently)."""
        with _LOCK:
            data = self.read()
            data.update(fields)
            data["updated_at"] = time.time()
            write_json_atomic(self.run_json, data)
            return data


def resolve_run_dir(config: Config) -> RunDir:
    """Check the output directory before anything is written; raise a ConfigError that says what to do."""
    raw = config.run.output_dir or str(Path("runs") / default_run_name(config))
    path = Path(raw).expanduser()
    where = f"field 'output_dir' = {raw}"
    if path.exists() and not path.is_dir():
        raise ConfigError("output_dir is a file, not a directory", where, "choose a directory path")
    run = RunDir(path)
    if path.is_dir() and os.environ.get("AUTOTUNING_LAUNCHED") == str(path.resolve()):
        return run  # a rank of a multi-process run: the launching parent checked and prepared this directory
    has_content = path.is_dir() and any(child.name != LOCK_FILE for child in path.iterdir())
    if config.training.resume:
        if not run.exists():
            raise ConfigError(
                "there is no run to resume in output_dir", where, "point output_dir at an earlier run's directory"
            )
        return run
    if has_content:
        if not config.run.overwrite_output_dir:
            raise ConfigError(
                "output_dir already holds files",
                where,
                "pass --resume to continue that run, set overwrite_output_dir: true to replace it, or pick a new output_dir",
            )
        if not run.exists():
            raise ConfigError(
                "output_dir holds files that are not an autotuning run; refusing to overwrite them",
                where,
                "pick an empty or new output_dir",
            )
    parent = path.parent if path.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    # Try for real: permission bits do not stop root, but a read-only mount or a quota does.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".autotuning-write-check-", dir=probe))
    except OSError as exc:
        raise ConfigError(
            f"cannot write to output_dir ({exc.strerror or exc})", where, "choose a writable directory"
        ) from None
    return run


def base_run_model(base_run: str | Path) -> Path:
    """The model a chained run starts from: the finished base run's merged model, or a ConfigError saying why not."""
    raw = str(base_run)
    where = f"field 'base_run' = {raw}"
    run = RunDir(Path(raw).expanduser())
    if not run.exists():
        raise ConfigError("not a run directory (no run.json)", where, "point base_run at a finished run's directory")
    status = run.read().get("status")
    if status != RunStatus.FINISHED.value:
        raise ConfigError(
            f"the base run is {status or 'unknown'}, not finished",
            where,
            "finish it first (resume it, or pick a finished run)",
        )
    if not (run.merged / "config.json").is_file():
        raise ConfigError(
            "the base run has no merged model",
            where,
            f"export it first: python -m autotuning export --run {run.path} --format torch",
        )
    return run.merged


def load_run_config(run_dir: str | Path, hf_token: str = "") -> Config:
    """The config a run was trained with. Its token is never saved: ``hf_token`` is the caller's (a browser
    session's), else the environment's where configs take it (the CLI)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            "not a run directory (no config.yaml)", str(run_dir), "pick a directory made by a training run"
        )
    config = load_config(path, [f"output_dir={Path(run_dir)}", "resume=false"])
    return config.replace(hf_token=hf_token) if hf_token else config


def list_runs(output_root: str | Path) -> list[dict[str, Any]]:
    """Runs under ``output_root``, newest first.

    A sweep's trials are listed as ``<sweep>/<trial>`` with ``sweep`` set. A run recorded as running whose lock no live job holds is 'interrupted' (its process died); one that a
    live job holds is 'running', whichever process that is.
    """
    root = Path(output_root)
    if not root.is_dir():
        return []
    rows = []
    for child, sweep in _run_dirs(root):
        run = RunDir(child)
        data = run.read()
        status = RunStatus.parse(data.get("status"))
        owner = lock_owner(child)
        if status in (RunStatus.RUNNING, RunStatus.LAUNCHING) and (owner is None or owner.get("operation") != "train"):
            status = RunStatus.INTERRUPTED
        results = data.get("eval_results") or {}
        rows.append(
            {
                "name": f"{sweep}/{child.name}" if sweep else child.name,
                "sweep": sweep,
                "path": str(child),
                "status": status.value,
                "busy": (owner or {}).get("operation", ""),
                "model": data.get("model_name", ""),
                "type": data.get("fine_tuning_type", ""),
                "step": data.get("global_step"),
                "eval_loss": results.get("eval_loss"),
                "accuracy": results.get("accuracy"),
                "f1": results.get("f1"),
                "started_at": data.get("started_at", 0),
            }
        )
    rows.sort(key=lambda r: r["started_at"] or 0, reverse=True)
    return rows


def _run_dirs(root: Path) -> list[tuple[Path, str]]:
    """(run directory, the sweep it is a trial of or "") for every run under ``root``: a sweep's folder
    (sweep.json) holds one run per trial."""
    found = []
    for child in root.iterdir():
        if not child.is_dir():
            continue
        if (child / "run.json").is_file():
            found.append((child, ""))
        elif (child / "sweep.json").is_file():
            found += [(trial, child.name) for trial in sorted(child.iterdir()) if (trial / "run.json").is_file()]
    return found


def clear_run_dir(path: Path) -> None:
    """Empty a run directory for a fresh run, keeping its lock file (the caller holds that lock)."""
    for child in path.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
