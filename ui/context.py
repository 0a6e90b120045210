"""What every tab shares: the pipeline (the one job), where runs live, and the model cache.

Shared job state lives here, in objects the app creates once, never in module globals; each
browser session's own state lives in gr.State.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotuning.inference import ModelCache
from autotuning.pipeline import Pipeline
from autotuning.runs import Comparison, RunStatus, SweepDir, compare_runs, is_sweep, list_runs, sweep_trial_dirs

__all__ = ["AppContext"]


@dataclass
class AppContext:
    pipeline: Pipeline
    output_root: Path
    workspace: Path
    models: ModelCache = field(default_factory=ModelCache)
    # Folders whose files may be typed as a dataset path in the app (besides uploads): --data-dir.
    data_dirs: list[Path] = field(default_factory=list)
    # Whether browser sessions may tick trust_remote_code / allow_pickle_weights: --allow-remote-code.
    allow_code: bool = False
    # The last sweep comparison and what it was built from (see sweep_comparison).
    _comparison: tuple[Any, ...] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(
        cls, output_root: str | Path, data_dirs: list[str | Path] | None = None, allow_code: bool = False
    ) -> AppContext:
        root = Path(output_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        workspace = root / ".workspace"
        workspace.mkdir(exist_ok=True)
        dirs = [Path(d).expanduser().resolve() for d in (data_dirs or [])]
        return cls(
            pipeline=Pipeline(root), output_root=root, workspace=workspace, data_dirs=dirs, allow_code=allow_code
        )

    def runs(self) -> list[dict]:
        return list_runs(self.output_root)

    def run_choices(self, finished_only: bool = False) -> list[tuple[str, str]]:
        rows = self.runs()
        if finished_only:
            rows = [r for r in rows if r["status"] == RunStatus.FINISHED]
        return [(f"{r['name']} ({r['status']})", r["path"]) for r in rows]

    def sweep_choices(self) -> list[tuple[str, str]]:
        """Sweep folders under the output root, newest first: (label with status and best trial, path)."""
        sweeps = [p for p in self.output_root.iterdir() if p.is_dir() and is_sweep(p)]
        choices = []
        for path in sorted(sweeps, key=lambda p: SweepDir(p).record_path.stat().st_mtime, reverse=True):
            record = SweepDir(path).read()
            best = record.get("best") or {}
            shown = f", best {best['name']}" if best.get("name") else ""
            choices.append(
                (f"{path.name} ({record.get('status', '?')}, {len(record.get('trials', []))} trials{shown})", str(path))
            )
        return choices

    def sweep_comparison(self, sweep_dir: str | Path) -> Comparison | None:
        """A sweep's comparison of its trials (None with fewer than two), rebuilt only when sweep.json or a trial's
        run.json changed.

        The Train tab's 1 s timer redraws a finished sweep's comparison on every tick, and compare_runs reads every
        trial's metrics.jsonl; a stat of each record per tick is all a repeat costs. run.json counts too, so a
        trial exported or pushed later still shows its new exports. One entry: the app has one sweep at a time.
        """
        sweep = SweepDir(sweep_dir)
        key = (str(sweep.path.resolve()), _mtime_ns(sweep.record_path))
        cached = self._comparison
        if cached is not None and cached[0] == key and cached[2] == _mtime_ns_all(cached[1]):
            return cached[3]
        trials = sweep_trial_dirs(sweep.path)
        stamps = _mtime_ns_all(trials)  # before reading them: a write during the read is caught on the next call
        comparison = compare_runs(trials, sweep.read().get("metric", "eval_loss")) if len(trials) >= 2 else None
        self._comparison = (key, trials, stamps, comparison)
        return comparison


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _mtime_ns_all(runs: list[Path]) -> tuple[int | None, ...]:
    return tuple(_mtime_ns(run / "run.json") for run in runs)
