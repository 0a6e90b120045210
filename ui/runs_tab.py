"""Tab 7: past runs under the output root; open one to see its curves, config and results."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from autotuning.runs import RunDir

from .charts import loss_figure
from .context import AppContext

__all__ = ["build", "wire", "runs_table"]


def runs_table(ctx: AppContext) -> pd.DataFrame:
    rows = ctx.runs()
    columns = ["name", "status", "model", "type", "step", "eval_loss", "accuracy", "f1"]
    return pd.DataFrame([{k: r.get(k) for k in columns} for r in rows], columns=columns)


def build(ctx: AppContext) -> dict:
    parts: dict = {}
    parts["refresh"] = gr.Button("Refresh")
    parts["table"] = gr.Dataframe(runs_table(ctx), label=f"Runs in {ctx.output_root}", interactive=False, elem_id="runs-table")
    parts["pick"] = gr.Dropdown(ctx.run_choices(), label="Open a run", elem_id="runs-pick")
    parts["loss"] = gr.Plot(label="Loss")
    with gr.Row():
        parts["config"] = gr.Code(label="config.yaml", language="yaml", interactive=False)
        parts["record"] = gr.Code(label="run.json", language="json", interactive=False)
    return parts


def wire(ctx: AppContext, parts: dict) -> None:
    def on_refresh():
        return runs_table(ctx), gr.update(choices=ctx.run_choices())

    parts["refresh"].click(on_refresh, outputs=[parts["table"], parts["pick"]])

    def on_pick(run_dir):
        if not run_dir:
            return None, "", ""
        run = RunDir(run_dir)
        config = run.config_path.read_text(encoding="utf-8") if run.config_path.is_file() else ""
        record = run.read()
        record.pop("versions", None)
        return loss_figure(ctx.pipeline.history(Path(run_dir))), config, json.dumps(record, indent=2, default=str)

    parts["pick"].change(on_pick, inputs=parts["pick"], outputs=[parts["loss"], parts["config"], parts["record"]])
