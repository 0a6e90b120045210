"""What every tab shares: the pipeline (the one job), where runs live, and the model cache.

Shared job state lives here, in objects the app creates once, never in module globals; each
browser session's own state lives in gr.State.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autotuning.inference import ModelCache
from autotuning.pipeline import Pipeline
from autotuning.runs import RunStatus, SweepDir, is_sweep, list_runs

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
