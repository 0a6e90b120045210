"""Tab 7: past runs under the output root; open one to see its curves, config and results."""

from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr
import pandas as pd

from autotuning.config import SWEEP_METRICS, lower_is_better
from autotuning.errors import UserError
from autotuning.runs import Comparison, RunDir, compare_runs, comparison_tables, format_cell, sweep_trial_dirs

from .charts import compare_figure, loss_figure
from .context import AppContext

__all__ = ["build", "wire", "runs_table", "report_link", "exports_cell", "comparison_markdown", "compare_view"]


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
    parts["refresh"] = gr.Button("Refresh", elem_id="runs-refresh")
    parts["table"] = gr.Dataframe(
        runs_table(ctx), label=f"Runs in {ctx.output_root}", interactive=False, elem_id="runs-table"
    )
    parts["pick"] = gr.Dropdown(ctx.run_choices(), label="Open a run", elem_id="runs-pick")
    parts["report"] = gr.HTML(elem_id="run-report")
    parts["loss"] = gr.Plot(label="Loss")
    with gr.Row():
        parts["config"] = gr.Code(label="config.yaml", language="yaml", interactive=False)
        parts["record"] = gr.Code(label="run.json", language="json", interactive=False)
    gr.Markdown("### Compare runs")
    with gr.Row():
        parts["compare_sweep"] = gr.Dropdown(
            ctx.sweep_choices(),
            value=None,
            label="A sweep",
            info="Picking one ticks its trials below and compares them",
            elem_id="compare-sweep",
        )
        parts["compare_metric"] = gr.Dropdown(
            list(SWEEP_METRICS),
            value="eval_loss",
            label="Best run by",
            info="Lower is better for a loss or perplexity, higher for the rest",
            elem_id="compare-metric",
        )
    parts["compare_runs"] = gr.CheckboxGroup(
        ctx.run_choices(), label="Runs to compare (two or more)", elem_id="compare-runs"
    )
    parts["compare"] = gr.Button("Compare", elem_id="compare-btn")
    parts["comparison"] = gr.Markdown(elem_id="compare-view")
    parts["compare_plot"] = gr.Plot(label="Loss, overlaid", elem_id="compare-plot")
    return parts


def comparison_markdown(c: Comparison) -> str:
    """The comparison as Markdown: the best run, the options that differ, the metrics and the exports.

    The tables are the CLI's (autotuning.runs.comparison_tables), framed as Markdown, with "–" for no value."""

    def table(rows: list[list[str]]) -> list[str]:
        escaped = [[cell.replace("|", "\\|") for cell in row] for row in rows]
        header, *body = escaped
        return [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in body),
        ]

    tables = comparison_tables(c, missing="–")
    direction = "lowest" if lower_is_better(c.metric) else "highest"
    if c.best:
        best = next(row for row in c.metrics if row["name"] == c.best)
        value = format_cell(best.get(c.metric), c.metric, missing="–")
        lines = [f"**Best by {c.metric} ({direction}): ⭐ `{c.best}`** — {c.metric} {value}"]
    else:
        lines = [f"**Best by {c.metric}:** none of these finished runs has it"]
    lines += ["", f"**Runs:** {len(c.names)}", ""]
    if tables.differs:
        lines += ["**Config that differs**", ""]
        lines += table(tables.differs)
    else:
        lines.append("**Config:** the same in every run")
    lines += ["", "**Metrics** (in brackets the gain over the base model; > 0 is better)", ""]
    header, *rows = tables.metrics
    lines += table([header, *([f"⭐ {r[0]} (best)" if r[0] == c.best else r[0], *r[1:]] for r in rows)])
    if tables.exports:
        lines += ["", "**Exports**", ""]
        lines += table(tables.exports)
    return "\n".join(lines)


def compare_view(paths: list[str], metric: str = "eval_loss"):
    """(Markdown, overlaid loss figure) for the ticked runs; a message and no figure when they cannot be compared."""
    if len(paths or []) < 2:
        return "Tick two or more runs (or pick a sweep) to compare them.", None
    try:
        comparison = compare_runs(paths, metric)
    except UserError as err:
        return f"**Cannot compare:** {err.message}", None
    return comparison_markdown(comparison), compare_figure(comparison.curves, comparison.best)


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
    def on_refresh(ticked):
        choices = ctx.run_choices()
        kept = [p for p in ticked or [] if p in [path for _, path in choices]]
        return (
            runs_table(ctx),
            gr.update(choices=choices),
            gr.update(choices=choices, value=kept),
            gr.update(choices=ctx.sweep_choices()),
        )

    parts["refresh"].click(
        on_refresh,
        inputs=parts["compare_runs"],
        outputs=[parts["table"], parts["pick"], parts["compare_runs"], parts["compare_sweep"]],
    )

    def on_sweep(sweep_dir, metric):
        if not sweep_dir:
            return gr.skip(), gr.skip(), gr.skip()
        trials = [str(p) for p in sweep_trial_dirs(sweep_dir)]
        text, figure = compare_view(trials, metric)
        return gr.update(choices=ctx.run_choices(), value=trials), text, figure

    parts["compare_sweep"].change(
        on_sweep,
        inputs=[parts["compare_sweep"], parts["compare_metric"]],
        outputs=[parts["compare_runs"], parts["comparison"], parts["compare_plot"]],
    )
    parts["compare"].click(
        compare_view,
        inputs=[parts["compare_runs"], parts["compare_metric"]],
        outputs=[parts["comparison"], parts["compare_plot"]],
    )

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
