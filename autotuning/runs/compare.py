"""Several runs side by side: the options that differ, the results, the exports, and the best run by a metric.

Read from what each run wrote (config.yaml, run.json, metrics.jsonl), so it works on any finished, stopped or
failed run, and the CLI's ``compare`` and the app's Runs tab show the same figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import SWEEP_METRICS, lower_is_better
from ..errors import ConfigError
from .directory import RunDir
from .events import read_metrics

__all__ = [
    "Comparison",
    "ComparisonTables",
    "compare_runs",
    "comparison_tables",
    "describe_comparison",
    "format_cell",
    "short_names",
]

# Options that say where a run lives or how it was started, not what it trained.
_IDENTITY = {"output_dir", "overwrite_output_dir", "resume"}
# eval_results keys that count things rather than score them.
_COUNTS = {"global_step", "eval_tokens", "eval_rows", "eval_pairs", "gen_samples", "samples"}


@dataclass
class Comparison:
    names: list[str]  # one short name per run, in the order given
    paths: list[str]
    status: list[str]
    differs: dict[str, list[Any]]  # option -> its value in each run (only options that differ)
    metrics: list[dict[str, Any]]  # one row per run: name, metric values, gains, train_s, peak_memory_bytes
    metric_keys: list[str]  # the metric columns, in display order
    exports: list[dict[str, str]]  # one per run: format -> "verified (rel 1.4e-05)"
    metric: str  # what picks the best run
    best: str | None  # the best run's name (None when no run has the metric)
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)  # name -> train/eval points

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": [{"name": n, "path": p, "status": s} for n, p, s in zip(self.names, self.paths, self.status)],
            "differs": {k: dict(zip(self.names, v)) for k, v in self.differs.items()},
            "metrics": {row["name"]: {k: v for k, v in row.items() if k != "name"} for row in self.metrics},
            "exports": dict(zip(self.names, self.exports)),
            "metric": self.metric,
            "best": self.best,
        }


def short_names(paths: list[Path]) -> list[str]:
    """Each run's folder name, with its parent's in front where two runs share a name (trials of two sweeps)."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _flat_config(run: RunDir) -> dict[str, Any]:
    try:
        data = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "sweep":
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _metric_row(name: str, record: dict[str, Any]) -> dict[str, Any]:
    results = record.get("eval_results") or {}
    row: dict[str, Any] = {"name": name}
    for key, value in results.items():
        if key.startswith("base_") or key in _COUNTS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        row[key] = value
        base = results.get(f"base_{key}")
        if isinstance(base, (int, float)) and not isinstance(base, bool):
            row[f"{key}_gain"] = (base - value) if lower_is_better(key) else (value - base)  # > 0: tuning helped
    timings = record.get("timings") or {}
    if "train_s" in timings:
        row["train_s"] = timings["train_s"]
    peak = record.get("train_peak_memory") or {}
    if peak.get("bytes"):
        row["peak_memory_bytes"] = peak["bytes"]
    row["step"] = record.get("global_step")
    return row


def _export_cells(record: dict[str, Any]) -> dict[str, str]:
    cells = {}
    for fmt, figures in (record.get("exports") or {}).items():
        if not isinstance(figures, dict):
            continue
        status = figures.get("status", "verified")
        rel = figures.get("rel_logit_diff")
        cells[fmt] = f"{status} (rel {rel:.2g})" if isinstance(rel, (int, float)) else status
    return cells


def _series(events: list[dict[str, Any]], kind: str, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in events if e.get("type") == kind and e.get(key) is not None]


def compare_runs(paths: list[str | Path], metric: str = "eval_loss") -> Comparison:
    """Compare runs (two or more run directories); ``metric`` (an eval_results key) picks the best."""
    runs = [RunDir(Path(p)) for p in paths]
    for run in runs:
        if not run.exists():
            raise ConfigError("not a run directory (no run.json)", str(run.path), "pass the run directories to compare")
    if len({r.path.resolve() for r in runs}) < 2:
        raise ConfigError("compare needs two different runs", ", ".join(map(str, paths)), "pass two or more runs")
    if metric not in SWEEP_METRICS:
        raise ConfigError(f"unknown metric {metric!r}", "--metric", f"use one of {', '.join(SWEEP_METRICS)}")
    names = short_names([r.path for r in runs])
    records = [r.read() for r in runs]
    configs = [_flat_config(r) for r in runs]
    keys = [k for k in dict.fromkeys(k for c in configs for k in c) if k not in _IDENTITY]
    differs = {k: [c.get(k) for c in configs] for k in keys if len({repr(c.get(k)) for c in configs}) > 1}
    metrics = [_metric_row(n, rec) for n, rec in zip(names, records)]
    metric_keys = list(dict.fromkeys(k for row in metrics for k in row if k not in ("name", "step")))
    metric_keys = [k for k in metric_keys if not k.endswith("_gain")]  # shown next to their metric
    scored = [
        (row[metric], row["name"])
        for row, rec in zip(metrics, records)
        if rec.get("status") == "finished" and isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])
    ]
    best = None
    if scored:
        best = (min if lower_is_better(metric) else max)(scored)[1]
    curves = {}
    for name, run in zip(names, runs):
        events = read_metrics(run.metrics_path)
        curves[name] = {"train": _series(events, "train", "loss"), "eval": _series(events, "eval", "eval_loss")}
    return Comparison(
        names=names,
        paths=[str(r.path) for r in runs],
        status=[str(rec.get("status", "unknown")) for rec in records],
        differs=differs,
        metrics=metrics,
        metric_keys=metric_keys,
        exports=[_export_cells(rec) for rec in records],
        metric=metric,
        best=best,
        curves=curves,
    )


def format_cell(value: Any, key: str = "", missing: str = "-") -> str:
    """One value as a table cell: 4 significant figures, a peak memory in GiB, a list or mapping in YAML flow."""
    if value is None:
        return missing
    if key == "peak_memory_bytes" and isinstance(value, (int, float)):
        return f"{value / 1024**3:.2f} GiB"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def _metric_cell(row: dict[str, Any], key: str, missing: str) -> str:
    """'5.439 (+0.33)': the value and, in brackets, its gain over the base model."""
    gain = row.get(f"{key}_gain")
    return format_cell(row.get(key), key, missing) + (f" ({gain:+.2g})" if isinstance(gain, (int, float)) else "")


@dataclass
class ComparisonTables:
    """The tables every view of a Comparison draws, as cells (header first, then one row per option or run).

    The CLI's text (describe_comparison) and the app's Markdown (ui/runs_tab.py) both render these, so the two
    show the same columns, rows and figures; only the frame and the best run's mark are theirs.
    """

    differs: list[list[str]]  # option, its value in each run; [] when every run has the same config
    metrics: list[list[str]]  # run, status, each metric (its gain over the base model in brackets)
    exports: list[list[str]]  # run, each format's verdict; [] when no run has an export


def comparison_tables(c: Comparison, missing: str = "-") -> ComparisonTables:
    """``missing`` fills a cell with no value (the Markdown view uses an en dash)."""
    differs = []
    if c.differs:
        differs = [["option", *c.names]]
        differs += [[k, *(format_cell(v, missing=missing) for v in vals)] for k, vals in c.differs.items()]
    metrics = [["run", "status", *c.metric_keys]]
    metrics += [
        [row["name"], status, *(_metric_cell(row, k, missing) for k in c.metric_keys)]
        for row, status in zip(c.metrics, c.status)
    ]
    formats = list(dict.fromkeys(f for e in c.exports for f in e))
    exports = []
    if formats:
        exports = [["run", *formats]]
        exports += [[n, *(e.get(f, missing) for f in formats)] for n, e in zip(c.names, c.exports)]
    return ComparisonTables(differs=differs, metrics=metrics, exports=exports)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    line = lambda cells: "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), *(line(r) for r in rows)]


def describe_comparison(c: Comparison) -> list[str]:
    """The comparison as text lines (what ``python -m autotuning compare`` prints before its JSON line)."""
    tables = comparison_tables(c)
    lines = ["runs:"]
    lines += [f"  {n}: {p} ({s})" for n, p, s in zip(c.names, c.paths, c.status)]
    if tables.differs:
        lines.append("config that differs:")
        lines += _table(tables.differs[0], tables.differs[1:])
    else:
        lines.append("config: the same in every run")
    best = f"best by {c.metric}: {c.best}" if c.best else f"best by {c.metric}: none (no finished run has it)"
    lines.append(f"metrics ({best}; in brackets the gain over the base model, > 0 is better):")
    # The status is in the runs list above: the metrics table here leaves its column out and marks the best '* '.
    header, *rows = tables.metrics
    rows = [[("* " if r[0] == c.best else "  ") + r[0], *r[2:]] for r in rows]
    lines += _table(["  run", *header[2:]], rows)
    if tables.exports:
        lines.append("exports:")
        lines += _table(tables.exports[0], tables.exports[1:])
    return lines
