"""Tab 5: export a finished run; files, sizes and the verification figures each exporter records."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from autotuning.errors import UserError
from autotuning.export import export_run

from .context import AppContext

__all__ = ["build", "wire"]


def build(ctx: AppContext) -> dict:
    parts: dict = {}
    with gr.Row():
        parts["run"] = gr.Dropdown(ctx.run_choices(finished_only=True), label="Run", elem_id="export-run", scale=4)
        parts["refresh"] = gr.Button("↻ Refresh", scale=1)
    parts["formats"] = gr.CheckboxGroup(["torch"], value=["torch"], label="Formats", elem_id="export-formats")
    gr.Markdown("TensorFlow SavedModel and GGUF are not available in this version yet.")
    parts["go"] = gr.Button("Export", variant="primary", elem_id="export-btn")
    parts["summary"] = gr.Markdown(elem_id="export-summary")
    parts["files"] = gr.Dataframe(headers=["file", "bytes"], label="Files", elem_id="export-files")
    parts["figures"] = gr.Code(label="Verification figures", language="json", interactive=False)
    parts["downloads"] = gr.File(label="Download", file_count="multiple", interactive=False)
    return parts


def wire(ctx: AppContext, parts: dict) -> None:
    parts["refresh"].click(lambda: gr.update(choices=ctx.run_choices(finished_only=True)), outputs=parts["run"])

    def on_export(run_dir, formats, progress=gr.Progress()):
        if not run_dir:
            raise gr.Error("Pick a finished run first.")
        if not formats:
            raise gr.Error("Pick at least one format.")
        progress(0.1, desc="merging, saving and reloading")
        try:
            exports = export_run(run_dir, formats)
        except UserError as err:
            raise gr.Error(err.message) from None
        torch_export = exports["torch"]
        merged = Path(torch_export["path"])
        files = [p for p in sorted(merged.iterdir()) if p.is_file()]
        table = pd.DataFrame([{"file": p.name, "bytes": p.stat().st_size} for p in files])
        verdict = "✅ verified" if torch_export["max_abs_logit_diff"] <= torch_export["tolerance"] else "❌ failed"
        summary = (
            f"**torch** → `{merged}` {verdict}: reloaded with AutoModelForCausalLM, max |logit diff| "
            f"{torch_export['max_abs_logit_diff']:.2e} (tolerance {torch_export['tolerance']:.0e}) vs {torch_export['reference']}"
        )
        return summary, table, json.dumps(exports, indent=2), [str(p) for p in files]

    parts["go"].click(
        on_export, inputs=[parts["run"], parts["formats"]], outputs=[parts["summary"], parts["files"], parts["figures"], parts["downloads"]]
    )
