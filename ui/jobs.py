"""Following a pipeline task from a Gradio handler: real progress while it runs, its result or its error after.

Handlers start a task (``ctx.pipeline.export(...)`` and the like), keep its id in the session's gr.State so
a Cancel button can reach it, and wait here. The work itself runs in the task's own thread, never in the
request thread; the handler only reads the task's state.
"""

from __future__ import annotations

import gradio as gr

from autotuning.pipeline import Task
from autotuning.runs import RunStatus

__all__ = ["follow", "cancel"]


def follow(task: Task, progress: gr.Progress, poll_s: float = 0.25):
    """Wait for ``task``, showing its progress; its result, or a gr.Error with its message."""
    while not task.wait(poll_s):
        state = task.progress()
        progress(state["fraction"], desc=state["what"])
    if task.status is RunStatus.FINISHED:
        return task.result
    if task.status is RunStatus.STOPPED:
        raise gr.Error(f"Cancelled: {task.error}")
    raise gr.Error(task.error or "the task failed")


def cancel(ctx, task_id: str | None) -> str:
    task = ctx.pipeline.task(task_id) if task_id else None
    if task is None or not task.is_active():
        return "Nothing to cancel."
    task.cancel()
    return "Cancelling at the next safe point (what is done is kept)."
