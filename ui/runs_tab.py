"""Tab 7: past runs under the output root; open one to see its curves, config and results."""

from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr
import pandas as pd

from autotuning.runs import RunDir

from .charts import loss_figure
from .context import AppContext

__all__ = ["build", "wire", "runs_table", "report_link", "exports_cell"]


_MARK = {"verified": "✅", "unverified": "⚠️ unverified", "failed": "⛔ failed", "skipped": "⛔ skipped"}


def exports_cell(run_dir: str | Path) -> str:
    """'torch ✅, gguf ⚠️ unverified': each export's verdict from run.json (older records: verified)."""
    exports = RunDir(run_dir).read().get("exports") or {}
    return ", ".join(
        f"{fmt} {_MARK.get(figures.get('status', 'verified'), figures.get('status'))}"
        for fmt, figures in exports.items()
        if isinstance(figures, dict)
    )


def runs_table(ctx: AppContext) -> pd.DataFrame:
    rows = ctx.runs()
    columns = ["name", "status", "model", "type", "step", "eval_loss", "accuracy", "f1", "exports"]
    return pd.DataFrame(
        [{**{k: r.get(k) for k in columns[:-1]}, "exports": exports_cell(r["path"])} for r in rows], columns=columns
    )


def build(ctx: AppContext) -> dict:
    parts: dict = {}
    parts["refresh"] = gr.Button("Refresh")
    parts["table"] = gr.Dataframe(
        runs_table(ctx), label=f"Runs in {ctx.output_root}", interactive=False, elem_id="runs-table"
    )
    parts["pick"] = gr.Dropdown(ctx.run_choices(), label="Open a run", elem_id="runs-pick")
    parts["report"] = gr.HTML(elem_id="run-report")
    parts["loss"] = gr.Plot(label="Loss")
    with gr.Row():
        parts["config"] = gr.Code(label="config.yaml", language="yaml", interactive=False)
        parts["record"] = gr.Code(label="run.json", language="json", interactive=False)
    return parts


def report_link(run_dir: str | Path) -> str:
    """A link that opens the run's report.html in a new tab (served from the output root), or a note."""
    report = Path(run_dir) / "report.html"
    if not report.is_file():
        return "<p>No report yet: it is written when the run finishes or stops.</p>"
    url = "/gradio_api/file=" + html.escape(str(report.resolve()), quote=True)
    return (
        f'<p><a id="report-link" href="{url}" target="_blank" rel="noopener">Open the run report</a> '
        "(curves, base vs fine-tuned metrics, sample predictions, export checksums; also report.md)</p>"
    )


def wire(ctx: AppContext, parts: dict) -> None:
    def on_refresh():
        return runs_table(ctx), gr.update(choices=ctx.run_choices())

    parts["refresh"].click(on_refresh, outputs=[parts["table"], parts["pick"]])

    def on_pick(run_dir):
        if not run_dir:
            return "", None, "", ""
        run = RunDir(run_dir)
        config = run.config_path.read_text(encoding="utf-8") if run.config_path.is_file() else ""
        record = run.read()
        record.pop("versions", None)
        history = ctx.pipeline.history(Path(run_dir))
        return report_link(run_dir), loss_figure(history), config, json.dumps(record, indent=2, default=str)

    parts["pick"].change(
        on_pick, inputs=parts["pick"], outputs=[parts["report"], parts["loss"], parts["config"], parts["record"]]
    )
