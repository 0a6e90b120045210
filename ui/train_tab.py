"""Tab 3: Start / Stop / Resume and the live view, redrawn from the pipeline about once a second.

The browser holds no training state: every tick asks the pipeline for the run's events, so a
reloaded page or a second tab redraws the whole curve so far.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from autotuning.errors import UserError
from autotuning.estimate import estimate_memory
from autotuning.runs import (
    RunStatus,
    SweepDir,
    is_locked,
    is_sweep,
    last_checkpoint,
    load_run_config,
    load_sweep_config,
)

from .charts import loss_figure, lr_figure, progress_html, rewards_figure, throughput_figure
from .context import AppContext
from .export_tab import exports_markdown
from .form import FORM_FIELDS, form_to_config, session_token
from .identity import login_token
from .runs_tab import comparison_markdown

__all__ = ["build", "wire", "snapshot", "start_from_form", "resume_run", "resumable_runs", "memory_markdown"]

_RESUMABLE = (RunStatus.STOPPED, RunStatus.INTERRUPTED, RunStatus.FAILED)


def build(ctx: AppContext, form: dict) -> dict:
    parts: dict = {}
    with gr.Row():
        parts["start"] = gr.Button("Start", variant="primary", elem_id="start-btn")
        parts["stop"] = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        parts["resume"] = gr.Button("Resume", elem_id="resume-btn")
        parts["estimate"] = gr.Button("Estimate memory", elem_id="estimate-btn")
    with gr.Row():
        parts["resume_run"] = gr.Dropdown(
            resumable_runs(ctx),
            value=None,
            label="Run to resume",
            info="Resume continues this run from its last checkpoint; left empty, the stopped run shown below",
            elem_id="resume-run",
            scale=4,
        )
        parts["resume_refresh"] = gr.Button("Refresh", scale=1)
    parts["memory"] = gr.Markdown(
        "Press **Estimate memory** to check whether this config fits before starting.", elem_id="memory-estimate"
    )
    parts["status"] = gr.Markdown("No run yet: set options, then press Start.", elem_id="train-status")
    parts["progress"] = gr.HTML(progress_html({}), elem_id="train-progress")
    with gr.Row():
        parts["loss"] = gr.Plot(label="Loss", elem_id="loss-plot")
        parts["rewards"] = gr.Plot(label="Rewards", elem_id="rewards-plot")
    with gr.Row():
        parts["lr"] = gr.Plot(label="Learning rate", elem_id="lr-plot")
        parts["throughput"] = gr.Plot(label="Throughput", elem_id="throughput-plot")
    parts["checkpoints"] = gr.Markdown(elem_id="checkpoints")
    parts["log"] = gr.Textbox(
        label="Log", lines=10, max_lines=10, autoscroll=True, interactive=False, elem_id="train-log"
    )
    parts["timer"] = gr.Timer(1.0)
    parts["drawn"] = gr.State(-1)  # per session: how many events the charts already show
    return parts


def _sweep_snapshot(ctx: AppContext, run) -> dict:
    """The sweep the shown run is a trial of (its progress, and once finished its comparison), or {}."""
    sweep = ctx.pipeline.sweep
    if sweep is None or run is None or run.run_dir.parent.resolve() != sweep.run_dir.resolve():
        return {}
    progress = sweep.progress()
    if progress["status"] == RunStatus.FINISHED:
        comparison = ctx.sweep_comparison(progress["sweep_dir"])  # cached: the timer asks every second
        if comparison is not None:
            progress["comparison"] = comparison_markdown(comparison)
    return progress


def snapshot(ctx: AppContext) -> dict:
    """Everything the Train tab shows, as plain data (used by the tick and by tests)."""
    run = ctx.pipeline.current
    if run is None:
        return {
            "status": "idle",
            "exports": {},
            "events": [],
            "progress": {},
            "log": "",
            "checkpoints": [],
            "error": "",
            "run_dir": "",
        }
    checkpoints = (
        sorted(
            (
                p.name
                for p in (run.run_dir / "checkpoints").glob("checkpoint-*")
                if (p / "trainer_state.json").is_file()
            ),
            key=lambda n: int(n.split("-")[1]),
        )
        if (run.run_dir / "checkpoints").is_dir()
        else []
    )
    events = run.events(0)  # fetched once per tick: the charts and the progress bar share it
    return {
        "status": run.status.value,
        "events": events,
        "progress": run.progress(events),
        "log": run.log_tail(40),
        "checkpoints": checkpoints,
        "error": run.error,
        "run_dir": str(run.run_dir),
        "notices": [e["message"] for e in events if e.get("type") == "notice"],
        "exports": (run.result.exports if run.result is not None else {}) or {},
        "sweep": _sweep_snapshot(ctx, run),
    }


_VERDICT_ICON = {"fits": "✅", "tight": "⚠️", "will not fit": "⛔"}


def memory_markdown(ctx: AppContext, values: dict, login: str = "") -> str:
    """The estimate for the form's config: verdict, breakdown table and suggestions, as Markdown.

    ``login`` is the session's Space login token (used when the form's token field is empty)."""

    try:
        config = form_to_config(values, ctx.output_root, ctx.data_dirs, ctx.allow_code, login)
        estimate = estimate_memory(config)
    except UserError as err:
        return f"**No estimate:** {err.message}"
    gib = 1024**3
    verdict = estimate.verdict
    facts = estimate.facts
    lines = [
        f"**Memory estimate: {_VERDICT_ICON[verdict]} {verdict}** — {estimate.total_bytes / gib:.2f} GiB needed "
        f"per {facts['per']}, {estimate.free_bytes / gib:.2f} GiB free on `{estimate.device}` "
        f"({facts['parameters'] / 1e6:.1f}M parameters, {facts['trainable_parameters'] / 1e6:.2f}M trainable, "
        f"{facts['tokens_per_micro_batch']} tokens per micro-batch)",
        "",
        "| part | GiB |",
        "|---|---:|",
        *[f"| {name.replace('_', ' ')} | {value / gib:.3f} |" for name, value in estimate.parts.items()],
        f"| **total** | **{estimate.total_bytes / gib:.3f}** |",
    ]
    if estimate.suggestions:
        lines.append("")
        lines.append("**To make it fit** (each on top of the previous):")
        for s in estimate.suggestions:
            lines.append(f"- {s['change']} → {s['estimate_bytes'] / gib:.2f} GiB ({s['verdict']})")
    return "\n".join(lines)


def _sweep_markdown(sweep: dict) -> str:
    best = sweep.get("best") or {}
    text = f"**Sweep:** `{sweep['status']}` &nbsp; `{sweep['sweep_dir']}` &nbsp; trial {sweep['trial']} of {sweep['trials']}"
    if best.get("name"):
        text += f" &nbsp; best so far: `{best['name']}` ({best['value']:.4g})"
    if sweep.get("error"):
        text += f"\n\n**Sweep error:** {sweep['error']}"
    if sweep["status"] == RunStatus.STOPPED:
        text += "\n\nThe sweep stopped with this trial: press **Resume** to continue it (this trial, then the rest)."
    if sweep.get("comparison"):  # a finished sweep ends on its comparison (Markdown)
        text += "\n\n" + sweep["comparison"]
    return text


def _status_markdown(snap: dict) -> str:
    status = snap["status"]
    if status == "idle":
        return "No run yet: set options, then press Start."
    text = f"**Status:** `{status}` &nbsp; **Run:** `{snap['run_dir']}`"
    if snap.get("sweep"):
        text = _sweep_markdown(snap["sweep"]) + "\n\n" + text
    if snap["error"]:
        text += f"\n\n**Error:** {snap['error']}"
    for notice in snap.get("notices", []):
        text += f"\n\n**Changed to fit in memory:** {notice}"
    if status == RunStatus.STOPPED and not snap.get("sweep"):
        text += "\n\nStopped with a checkpoint saved: press **Resume** to continue from it."
    if status == RunStatus.FINISHED:
        text += "\n\nFinished: see the Evaluate, Export and Chat tabs."
        if snap.get("exports"):
            text += "\n\n**Exports:**\n\n" + exports_markdown(snap["exports"])
    return text


def start_from_form(ctx: AppContext, values: dict, login: str = "") -> str:
    config = form_to_config(values, ctx.output_root, ctx.data_dirs, ctx.allow_code, login)
    job = ctx.pipeline.start(config)
    if config.search.sweep:
        return f"Started the sweep `{job.run_dir}` ({job.total} trials, one after another)."
    return f"Started `{job.run_dir}`."


def resumable_runs(ctx: AppContext) -> list[tuple[str, str]]:
    """Runs that stopped, crashed or failed with a checkpoint to continue from (no live job holds them), and sweeps
    that did not finish (a sweep resumes as a whole: its stopped trial, then the rest)."""
    rows = [r for r in ctx.runs() if r["status"] in _RESUMABLE and not r.get("busy") and not r.get("sweep")]
    choices = [
        (f"{r['name']} ({r['status']}, step {r.get('step') or '?'})", r["path"])
        for r in rows
        if last_checkpoint(Path(r["path"]) / "checkpoints") is not None
    ]
    for path in ctx.output_root.iterdir():
        if not is_sweep(path) or is_locked(path):
            continue
        record = SweepDir(path).read()
        left = [t["name"] for t in record.get("trials", []) if t.get("status") != RunStatus.FINISHED]
        if record.get("status") != RunStatus.FINISHED and left:
            choices.append(
                (f"sweep {path.name} ({record.get('status')}, {len(left)} trials left from {left[0]})", str(path))
            )
    return choices


def resume_run(ctx: AppContext, run_dir: str | None, hf_token: str = "") -> str:
    """Resume the run the user picked, or, with none picked, the stopped run the Train tab is showing.

    Never a guess among other runs: on a shared app the newest resumable run may be someone else's.
    ``hf_token`` is the session's (a run's token is never saved with it).
    """
    if not run_dir:
        current = ctx.pipeline.current
        if current is None or current.status not in _RESUMABLE:
            raise UserError("no run picked to resume", "Train tab, 'Run to resume'", "pick the run to continue")
        sweep = ctx.pipeline.sweep
        trial_of_sweep = sweep is not None and current.run_dir.parent.resolve() == sweep.run_dir.resolve()
        run_dir = str(sweep.run_dir if trial_of_sweep else current.run_dir)
    path = Path(run_dir)
    if is_sweep(path) and path.resolve().parent == ctx.output_root.resolve():
        ctx.pipeline.start(load_sweep_config(path).replace(hf_token=hf_token, resume=True))
        return f"Resuming the sweep `{path}`."
    if path.resolve().parent.parent == ctx.output_root.resolve() and is_sweep(path.parent):
        raise UserError(
            "that run is a trial of a sweep", str(path), f"resume the sweep instead: pick 'sweep {path.parent.name}'"
        )
    if path.resolve().parent != ctx.output_root.resolve() or last_checkpoint(path / "checkpoints") is None:
        raise UserError("that run has no checkpoint to resume from", str(path), "pick another run or start anew")
    ctx.pipeline.start(load_run_config(path, hf_token).replace(resume=True))
    return f"Resuming `{path}`."


def wire(ctx: AppContext, form: dict, parts: dict) -> None:
    inputs = [form[name] for name in FORM_FIELDS]
    view = [
        parts["status"],
        parts["progress"],
        parts["loss"],
        parts["lr"],
        parts["throughput"],
        parts["rewards"],
        parts["checkpoints"],
        parts["log"],
        parts["drawn"],
    ]

    def render(drawn: int, message: str = ""):
        snap = snapshot(ctx)
        status = _status_markdown(snap)
        if message:
            status = f"{message}\n\n{status}"
        events = snap["events"]
        checkpoints = ", ".join(f"`{c}`" for c in snap["checkpoints"]) or "none yet"
        if len(events) == drawn:
            charts = [gr.skip(), gr.skip(), gr.skip(), gr.skip()]
        else:
            charts = [loss_figure(events), lr_figure(events), throughput_figure(events), rewards_figure(events)]
        return [
            status,
            progress_html(snap["progress"]),
            *charts,
            f"**Checkpoints:** {checkpoints}",
            snap["log"],
            len(events),
        ]

    # The handlers that read from the Hub take the session's Space login: gradio fills a gr.OAuthToken parameter
    # (None when not signed in, and always off a Space: see ui/identity.py).
    def on_start(drawn, login: gr.OAuthToken | None, *args):
        try:
            message = start_from_form(ctx, dict(zip(FORM_FIELDS, args)), login_token(login))
        except UserError as err:
            message = f"**Not started:** {err.message}"
        return render(-1, message)

    def on_stop(drawn):
        job = ctx.pipeline.job
        if job is None or not job.is_active():
            return render(drawn, "Nothing is running.")
        job.stop()
        if job is ctx.pipeline.sweep:
            return render(drawn, "Stopping this trial at the next step (a checkpoint will be saved), then the sweep.")
        return render(drawn, "Stopping at the next step; a checkpoint will be saved.")

    def on_resume(drawn, picked, hf_token, login: gr.OAuthToken | None):
        try:
            message = resume_run(ctx, picked, session_token(hf_token, login_token(login)))
        except UserError as err:
            message = f"**Not resumed:** {err.message}"
        return render(-1, message)

    def on_estimate(login: gr.OAuthToken | None, *args):
        return memory_markdown(ctx, dict(zip(FORM_FIELDS, args)), login_token(login))

    parts["start"].click(on_start, inputs=[parts["drawn"], *inputs], outputs=view)
    # Start shows the estimate too, so a run that is about to run out of memory says so next to its chart.
    parts["start"].click(on_estimate, inputs=inputs, outputs=parts["memory"], show_progress="hidden")
    parts["estimate"].click(on_estimate, inputs=inputs, outputs=parts["memory"])
    parts["stop"].click(on_stop, inputs=parts["drawn"], outputs=view)
    parts["resume"].click(on_resume, inputs=[parts["drawn"], parts["resume_run"], form["hf_token"]], outputs=view)

    def on_refresh_resumable(current):
        choices = resumable_runs(ctx)
        return gr.update(choices=choices, value=current if current in [path for _, path in choices] else None)

    parts["resume_refresh"].click(on_refresh_resumable, inputs=parts["resume_run"], outputs=parts["resume_run"])
    # Named, so an API client can follow a run as the page does.
    parts["timer"].tick(
        lambda drawn: render(drawn), inputs=parts["drawn"], outputs=view, show_progress="hidden", api_name="train_view"
    )
