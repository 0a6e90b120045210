"""The "pick a finished run" dropdown with its Refresh button, shared by the Evaluate, Export and Chat tabs."""

from __future__ import annotations

import gradio as gr

from .context import AppContext

__all__ = ["build_run_picker", "finished_runs_update"]


def finished_runs_update(ctx: AppContext, current: str | None):
    """Fresh choices; keeps the chosen run if it is still there, else picks the newest finished one."""
    choices = ctx.run_choices(finished_only=True)
    paths = [path for _, path in choices]
    return gr.update(choices=choices, value=current if current in paths else (paths[0] if paths else None))


def build_run_picker(ctx: AppContext, parts: dict, elem_id: str, label: str = "Run") -> None:
    """Adds parts["run"] and parts["refresh"] in the caller's row, the refresh already wired."""
    parts["run"] = gr.Dropdown(ctx.run_choices(finished_only=True), label=label, elem_id=elem_id, scale=4)
    parts["refresh"] = gr.Button("Refresh", scale=1)
    parts["refresh"].click(
        lambda current: finished_runs_update(ctx, current), inputs=parts["run"], outputs=parts["run"]
    )
