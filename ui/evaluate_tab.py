"""Tab 4: evaluate a finished run on its held-out rows; answers next to references; download results."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from autotuning.errors import UserError

from .context import AppContext
from .form import session_token
from .identity import login_token
from .jobs import cancel, follow
from .run_picker import build_run_picker

__all__ = ["build", "wire"]


def build(ctx: AppContext) -> dict:
    parts: dict = {}
    with gr.Row():
        build_run_picker(ctx, parts, "eval-run")
        parts["generations"] = gr.Slider(0, 20, value=5, step=1, label="Generated answers to show", scale=2)
    with gr.Row():
        parts["go"] = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
        parts["cancel"] = gr.Button("Cancel", elem_id="eval-cancel")
    parts["note"] = gr.Markdown(elem_id="eval-note")
    parts["task"] = gr.State(None)  # this session's evaluation task, for Cancel
    parts["metrics"] = gr.Dataframe(
        headers=["metric", "fine-tuned", "base"],
        label="Metrics: fine-tuned vs base model, same held-out rows",
        elem_id="eval-metrics",
    )
    parts["samples"] = gr.Dataframe(
        headers=["prompt", "reference", "prediction", "base_prediction"],
        label="Generated answers (fine-tuned and base) vs references",
        wrap=True,
        elem_id="eval-samples",
    )
    parts["file"] = gr.File(label="eval_results", interactive=False)
    return parts


def wire(ctx: AppContext, parts: dict, hf_token: gr.Textbox) -> None:
    """``hf_token`` is the Model & config tab's token field: the base model and data may be private."""

    def on_evaluate(run_dir, generations, typed_token, login: gr.OAuthToken | None, progress=gr.Progress()):
        """Starts the evaluation task, hands its id to the session (for Cancel), follows it, shows the results."""
        if not run_dir:
            raise gr.Error("Pick a finished run first.")
        try:
            token = session_token(typed_token, login_token(login))
            task = ctx.pipeline.evaluate(run_dir, generations=int(generations), hf_token=token)
        except UserError as err:
            raise gr.Error(err.message) from None
        yield {parts["task"]: task.id}
        yield dict(zip(shown_outputs, _shown(follow(task, progress))))

    def _shown(report):
        results = report["results"]

        def fmt(v):
            return round(v, 6) if isinstance(v, float) else v

        metrics = pd.DataFrame(
            [
                {"metric": k, "fine-tuned": fmt(v), "base": fmt(results.get(f"base_{k}", ""))}
                for k, v in results.items()
                if not k.startswith("base_")
            ]
        )
        samples = pd.DataFrame(report["samples"])
        if "rejected" in samples.columns:  # a preference run: the reference is the chosen answer
            samples = samples.rename(columns={"reference": "chosen"})
        samples = samples.map(lambda v: v if not isinstance(v, str) or len(v) <= 300 else v[:300] + " …")
        widths = [f"{100 // max(1, len(samples.columns))}%"] * len(samples.columns)
        return metrics, gr.update(value=samples, column_widths=widths), report["path"]

    shown_outputs = [parts["metrics"], parts["samples"], parts["file"]]
    parts["go"].click(
        on_evaluate, inputs=[parts["run"], parts["generations"], hf_token], outputs=[parts["task"], *shown_outputs]
    )
    parts["cancel"].click(lambda task_id: cancel(ctx, task_id), inputs=parts["task"], outputs=parts["note"])
