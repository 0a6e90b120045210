"""The run report: ``report.html`` (self-contained, with plotly curves) and ``report.md`` in the run directory.

Everything comes from what the run wrote (run.json, config.yaml, metrics.jsonl, eval results,
predictions.jsonl, export folders), so the report can be rebuilt at any time (the job writes it at the
end, ``export`` and ``evaluate`` rewrite it) and it never shows anything the run did not record. The
token is never in those files; config values named like secrets are redacted again anyway.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from pathlib import Path
from typing import Any

from .runs import RunDir, write_json_atomic
from .training.metrics import read_metrics

__all__ = ["write_report", "build_report"]

_SHOWN_PREDICTIONS = 10
_HASH_CACHE = ".checksums.json"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _sha256(path: Path, cache: dict[str, Any]) -> str:
    """sha256 of a file, cached by (size, mtime) so rewriting the report does not rehash gigabytes."""
    stat = path.stat()
    key = str(path)
    hit = cache.get(key)
    if hit and hit["size"] == stat.st_size and hit["mtime"] == stat.st_mtime:
        return hit["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    cache[key] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": digest.hexdigest()}
    return cache[key]["sha256"]


def _export_files(run: RunDir, exports: dict[str, Any]) -> list[dict[str, Any]]:
    cache_path = run.path / _HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cache = {}
    folders = {
        "torch": run.merged,
        "adapter": run.adapter,
        "gguf": run.path / "gguf",
        "tensorflow": run.path / "tensorflow",
    }
    rows = []
    for fmt, folder in folders.items():
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rows.append(
                {
                    "format": fmt,
                    "file": str(path.relative_to(run.path)),
                    "bytes": path.stat().st_size,
                    "sha256": _sha256(path, cache),
                }
            )
    write_json_atomic(cache_path, cache)
    return rows


def _metric_rows(results: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, base, tuned) for every metric; base is None where the base was not scored."""
    rows = []
    for key, value in results.items():
        if key.startswith("base_") or key == "global_step":
            continue
        rows.append((key, results.get(f"base_{key}"), value))
    return rows


def _verification(exports: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for fmt, figures in exports.items():
        if not isinstance(figures, dict):
            continue
        shown = {k: v for k, v in figures.items() if not isinstance(v, (list, dict)) and k not in ("path", "bytes")}
        out.append((fmt, ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items())))
    return out


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, as plain data."""
    run = RunDir(run_dir)
    record = run.read()
    config_text = run.config_path.read_text(encoding="utf-8") if run.config_path.is_file() else ""
    config_text = "\n".join(
        line
        if not any(s in line.split(":")[0].lower() for s in ("token", "secret", "password"))
        else line.split(":")[0] + ": ***"
        for line in config_text.splitlines()
    )
    predictions_path = run.path / "predictions.jsonl"
    predictions = (
        [json.loads(line) for line in predictions_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if predictions_path.is_file()
        else []
    )
    results = record.get("eval_results") or {}
    exports = record.get("exports") or {}
    return {
        "name": run.path.name,
        "record": record,
        "config_text": config_text,
        "events": read_metrics(run.metrics_path),
        "metrics": _metric_rows(results),
        "predictions": predictions[:_SHOWN_PREDICTIONS],
        "predictions_total": len(predictions),
        "files": _export_files(run, exports),
        "verification": _verification(exports),
    }


# --------------------------------------------------------------------------- html


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c)) if c is not None else '–'}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _curves_html(events: list[dict[str, Any]]) -> str:
    import plotly.io as pio

    def series(kind: str, key: str):
        points = [(e["step"], e[key]) for e in events if e.get("type") == kind and e.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    x, y = series("train", "loss")
    ex, ey = series("eval", "eval_loss")
    lx, ly = series("train", "learning_rate")
    traces = [
        {"type": "scatter", "x": x, "y": y, "mode": "lines+markers", "name": "train loss"},
        {
            "type": "scatter",
            "x": ex,
            "y": ey,
            "mode": "lines+markers",
            "name": "eval loss",
            "marker": {"symbol": "diamond", "size": 8},
        },
        {
            "type": "scatter",
            "x": lx,
            "y": ly,
            "mode": "lines",
            "name": "learning rate",
            "yaxis": "y2",
            "line": {"dash": "dot"},
        },
    ]
    layout = {
        "title": {"text": "Loss and learning rate"},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": "loss"}},
        "yaxis2": {"title": {"text": "learning rate"}, "overlaying": "y", "side": "right", "showgrid": False},
        "height": 420,
        "margin": {"l": 60, "r": 60, "t": 50, "b": 50},
        "legend": {"orientation": "h"},
    }
    # plotly.js inlined: the report opens offline, from a file, years later.
    return pio.to_html({"data": traces, "layout": layout}, include_plotlyjs=True, full_html=False, div_id="loss-chart")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2937;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #e5e7eb;padding-bottom:.3rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}th,td{border:1px solid #e5e7eb;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f4f6}td.num{text-align:right}.muted{color:#6b7280}pre{background:#f9fafb;border:1px solid #e5e7eb;padding:.8rem;overflow:auto;font-size:.85rem}
.pred td{max-width:300px;white-space:pre-wrap;word-break:break-word}.status{display:inline-block;padding:.1rem .5rem;border-radius:.3rem;background:#e0f2fe}
"""


def _html(data: dict[str, Any]) -> str:
    r = data["record"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>autotuning report: {esc(data['name'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run report: {esc(data['name'])}</h1>",
        f"<p><span class='status' id='run-status'>{esc(str(r.get('status', 'unknown')))}</span> "
        f"{esc(str(r.get('model_name', '')))} · {esc(str(r.get('fine_tuning_type', '')))} · device {esc(str(r.get('device', '')))} "
        f"· precision {esc(str(r.get('precision', '')))} · step {esc(str(r.get('global_step', '')))}</p>",
    ]
    started, finished = r.get("started_at"), r.get("finished_at")
    if started:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        took = f", {finished - started:.0f} s" if finished else ""
        parts.append(f"<p class='muted'>started {esc(when)}{esc(took)}</p>")
    selection = r.get("checkpoint_selection")
    if selection:
        kept = Path(selection["best_checkpoint"]).name if selection.get("best_checkpoint") else "none"
        parts.append(
            f"<p id='checkpoint-selection'><b>Checkpoint kept:</b> {esc(kept)} ({esc(selection.get('why', ''))}); "
            f"{'restored at the end' if selection.get('restored') else 'not restored'}"
            f"{'; training stopped early (no improvement within the patience)' if selection.get('early_stopped') else ''}.</p>"
        )
    for retry in r.get("oom_retries") or []:
        parts.append(f"<p><b>Out of memory at step {retry['step']}:</b> retried with {esc(retry['change'])}.</p>")

    parts.append("<h2>Curves</h2>")
    parts.append(_curves_html(data["events"]) if data["events"] else "<p class='muted'>no metric events</p>")

    parts.append("<h2>Metrics: base vs fine-tuned</h2>")
    if data["metrics"]:
        rows = []
        for name, base, tuned in data["metrics"]:
            delta = tuned - base if isinstance(base, (int, float)) and isinstance(tuned, (int, float)) else None
            rows.append([name, base, tuned, delta])
        parts.append(_table(["metric", "base", "fine-tuned", "change"], rows, "metrics"))
        parts.append(
            "<p class='muted'>eval_loss/perplexity/accuracy/f1: answer tokens of the held-out rows (shifted). "
            "gen_*: greedy answers generated with the chat template.</p>"
        )
    else:
        parts.append("<p class='muted'>no evaluation results</p>")

    if data["predictions"]:
        parts.append(f"<h2>Sample predictions ({len(data['predictions'])} of {data['predictions_total']})</h2>")
        rows = [
            [p.get("prompt", ""), p.get("reference", ""), p.get("base_prediction"), p.get("prediction", "")]
            for p in data["predictions"]
        ]
        parts.append(_table(["prompt", "reference", "base", "fine-tuned"], rows, "pred"))

    ds = r.get("dataset") or {}
    if ds:
        parts.append("<h2>Dataset</h2>")
        parts.append(
            f"<p>fingerprint <code>{esc(str(ds.get('fingerprint', '')))}</code>, {esc(str(ds.get('rows_read', '')))} rows read, "
            f"{esc(str(ds.get('rows_skipped', 0)))} skipped</p>"
        )
        split_rows = []
        for split in ("train", "eval"):
            s = ds.get(split) or {}
            if s:
                split_rows.append(
                    [
                        split,
                        s.get("rows"),
                        s.get("median_tokens"),
                        s.get("p95_tokens"),
                        s.get("max_tokens"),
                        s.get("truncated_rows"),
                        s.get("answer_lost_rows"),
                        s.get("answer_tokens"),
                    ]
                )
        parts.append(
            _table(
                ["split", "rows", "median tokens", "p95", "max", "truncated", "dropped", "answer tokens"], split_rows
            )
        )
        for note in ds.get("notes") or []:
            parts.append(f"<p class='muted'>note: {esc(note)}</p>")

    parts.append("<h2>Exports</h2>")
    if data["verification"]:
        parts.append(_table(["format", "verification"], [list(v) for v in data["verification"]]))
    if data["files"]:
        parts.append(
            _table(
                ["format", "file", "bytes", "sha256"],
                [[f["format"], f["file"], f["bytes"], f["sha256"]] for f in data["files"]],
                "files",
            )
        )
    else:
        parts.append("<p class='muted'>no exports</p>")

    timings = r.get("timings") or {}
    peak = r.get("train_peak_memory") or {}
    parts.append("<h2>Timings and memory</h2>")
    rows = [[k, v] for k, v in timings.items()]
    if peak:
        rows.append([f"training peak ({peak.get('what', '')})", f"{peak.get('bytes', 0) / 2**20:.0f} MiB"])
    parts.append(_table(["what", "value"], rows))
    parts.append("<h2>Config</h2>")
    parts.append(f"<pre>{esc(data['config_text'])}</pre>")
    versions = r.get("versions") or {}
    if versions:
        parts.append("<h2>Library versions</h2>")
        parts.append(_table(["library", "version"], [[k, v] for k, v in versions.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- markdown


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(c: Any) -> str:
        return "–" if c is None else _fmt(c).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in rows
    ]


def _markdown(data: dict[str, Any]) -> str:
    r = data["record"]
    lines = [
        f"# Run report: {data['name']}",
        "",
        f"Status **{r.get('status', 'unknown')}** · {r.get('model_name', '')} · {r.get('fine_tuning_type', '')} · "
        f"device {r.get('device', '')} · step {r.get('global_step', '')}",
        "",
    ]
    selection = r.get("checkpoint_selection")
    if selection:
        kept = Path(selection["best_checkpoint"]).name if selection.get("best_checkpoint") else "none"
        lines += [
            f"Checkpoint kept: **{kept}** ({selection.get('why', '')}); restored: {selection.get('restored')}; "
            f"stopped early: {selection.get('early_stopped')}.",
            "",
        ]
    train = [e for e in data["events"] if e.get("type") == "train" and e.get("loss") is not None]
    evals = [e for e in data["events"] if e.get("type") == "eval"]
    lines += ["## Curves", "", "The interactive chart is in report.html; the points are in metrics.jsonl.", ""]
    if train:
        lines.append(
            f"Train loss {train[0]['loss']:.4f} (step {train[0]['step']}) → {train[-1]['loss']:.4f} (step {train[-1]['step']})."
        )
    if evals:
        lines.append("Eval loss: " + ", ".join(f"{e['eval_loss']:.4f} @ {e['step']}" for e in evals) + ".")
    lines += ["", "## Metrics: base vs fine-tuned", ""]
    lines += (
        _md_table(["metric", "base", "fine-tuned"], [[n, b, t] for n, b, t in data["metrics"]])
        if data["metrics"]
        else ["no evaluation results"]
    )
    if data["predictions"]:
        lines += ["", f"## Sample predictions ({len(data['predictions'])} of {data['predictions_total']})", ""]
        lines += _md_table(
            ["prompt", "reference", "base", "fine-tuned"],
            [
                [p.get("prompt", "")[:200], p.get("reference", ""), p.get("base_prediction"), p.get("prediction", "")]
                for p in data["predictions"]
            ],
        )
    ds = r.get("dataset") or {}
    if ds:
        lines += [
            "",
            "## Dataset",
            "",
            f"Fingerprint `{ds.get('fingerprint', '')}`, {ds.get('rows_read', '')} rows read.",
            "",
        ]
        lines += _md_table(
            ["split", "rows", "median tokens", "truncated", "dropped"],
            [
                [
                    s,
                    (ds.get(s) or {}).get("rows"),
                    (ds.get(s) or {}).get("median_tokens"),
                    (ds.get(s) or {}).get("truncated_rows"),
                    (ds.get(s) or {}).get("answer_lost_rows"),
                ]
                for s in ("train", "eval")
                if ds.get(s)
            ],
        )
    lines += ["", "## Exports", ""]
    lines += (
        _md_table(["format", "verification"], [list(v) for v in data["verification"]])
        if data["verification"]
        else ["no exports"]
    )
    if data["files"]:
        lines.append("")
        lines += _md_table(["file", "bytes", "sha256"], [[f["file"], f["bytes"], f["sha256"]] for f in data["files"]])
    lines += ["", "## Timings", ""] + _md_table(
        ["what", "seconds"], [[k, v] for k, v in (r.get("timings") or {}).items()]
    )
    lines += ["", "## Config", "", "```yaml", data["config_text"], "```", ""]
    versions = r.get("versions") or {}
    if versions:
        lines += ["## Library versions", ""] + _md_table(["library", "version"], [[k, v] for k, v in versions.items()])
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html and report.md (atomically) and return their paths."""
    run = RunDir(run_dir)
    data = build_report(run.path)
    out = []
    for name, text in (("report.html", _html(data)), ("report.md", _markdown(data))):
        path = run.path / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        out.append(path)
    return out[0], out[1]
