"""The Gradio app: one module per tab over the autotuning pipeline facade."""

from __future__ import annotations

import os

import gradio as gr
import torch

from autotuning.resources import ASSETS

from . import chat_tab, config_tab, dataset_tab, evaluate_tab, export_tab, runs_tab, train_tab
from .context import AppContext
from .hardware import hardware_notice
from .identity import build_login
from .run_picker import finished_runs_update

__all__ = ["build_app", "AppContext", "ASSETS", "theme"]


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="sky")


def _cuda_available() -> bool:

    return torch.cuda.is_available()


def build_app(ctx: AppContext) -> gr.Blocks:
    """Build every tab, then wire events (wiring needs components from several tabs)."""
    form: dict = {}
    with gr.Blocks(title="autotuning") as demo:
        logo = (ASSETS / "logo.svg").read_text(encoding="utf-8")
        gr.HTML(
            f'<div class="at-header">{logo}<div><h1>autotuning</h1>'
            "<p>Fine-tune causal language models with LoRA: data, training, evaluation, verified exports.</p></div></div>"
        )
        build_login(os.environ)  # a Space with OAuth only: visitors then read the Hub as themselves
        notice = hardware_notice(os.environ, _cuda_available())
        if notice:  # a Space on a CPU: say up front what needs a GPU
            gr.Markdown(notice, elem_id="hardware-notice", elem_classes=["at-notice"])
        with gr.Tabs():
            with gr.Tab("Model & config", id="config"):
                config_parts = config_tab.build(ctx, form)
            with gr.Tab("Dataset", id="dataset"):
                dataset_parts = dataset_tab.build(ctx, form)
            with gr.Tab("Train", id="train"):
                train_parts = train_tab.build(ctx, form)
            with gr.Tab("Evaluate", id="evaluate") as evaluate_tab_ui:
                evaluate_parts = evaluate_tab.build(ctx)
            with gr.Tab("Export", id="export") as export_tab_ui:
                export_parts = export_tab.build(ctx)
            with gr.Tab("Chat", id="chat") as chat_tab_ui:
                chat_parts = chat_tab.build(ctx)
            with gr.Tab("Runs", id="runs") as runs_tab_ui:
                runs_parts = runs_tab.build(ctx)
        for name, component in form.items():  # stable ids for browser tests and custom CSS
            if not isinstance(component, gr.State) and not component.elem_id:
                component.elem_id = f"cfg-{name}"
        config_tab.wire(ctx, form, config_parts)
        dataset_tab.wire(ctx, form, dataset_parts)
        train_tab.wire(ctx, form, train_parts)
        evaluate_tab.wire(ctx, evaluate_parts, form["hf_token"])
        export_tab.wire(ctx, export_parts, form["hf_token"])
        chat_tab.wire(ctx, chat_parts, form["hf_token"])
        runs_tab.wire(ctx, runs_parts)

        # A (re)loaded page shows fresh run lists.
        def refresh_lists():
            finished = gr.update(choices=ctx.run_choices(finished_only=True))
            return finished, finished, finished, runs_tab.runs_table(ctx), gr.update(choices=ctx.run_choices())

        # Opening a tab refreshes its run list and picks the newest finished run if none is chosen.
        for tab, parts in ((evaluate_tab_ui, evaluate_parts), (export_tab_ui, export_parts), (chat_tab_ui, chat_parts)):
            tab.select(lambda current: finished_runs_update(ctx, current), inputs=parts["run"], outputs=parts["run"])
        runs_tab_ui.select(
            lambda: (runs_tab.runs_table(ctx), gr.update(choices=ctx.run_choices())),
            outputs=[runs_parts["table"], runs_parts["pick"]],
        )
        config_tab.validate_on_load(demo, ctx, form, config_parts)
        demo.load(
            refresh_lists,
            outputs=[
                evaluate_parts["run"],
                export_parts["run"],
                chat_parts["run"],
                runs_parts["table"],
                runs_parts["pick"],
            ],
        )
    return demo
