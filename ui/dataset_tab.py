"""Tab 2: choose the data, preview it normalised, see token lengths, truncation and the loss mask."""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from autotuning.config import TrainedTurns, field_help
from autotuning.data import encode_answer, mask_segments, prepare_data, prepare_preference_data, preview_rows
from autotuning.errors import UserError
from autotuning.modeling import load_tokenizer

from .charts import length_histogram
from .context import AppContext
from .form import (
    DATASET_SOURCES,
    FORM_FIELDS,
    SOURCE_HUB,
    SOURCE_QUICKSTART,
    SOURCE_UPLOAD,
    form_to_config,
    stage_upload,
)
from .identity import login_token

__all__ = ["build", "wire", "inspect_form"]


def build(ctx: AppContext, form: dict) -> dict:
    parts: dict = {}
    with gr.Row():
        with gr.Column(scale=2):
            form["dataset_source"] = gr.Radio(
                DATASET_SOURCES, value=SOURCE_QUICKSTART, label="Dataset", elem_id="dataset-source"
            )
            form["hub_dataset"] = gr.Textbox(
                label="Hub dataset id", placeholder="e.g. yahma/alpaca-cleaned", visible=False
            )
            parts["upload_file"] = gr.File(
                label="Upload .json / .jsonl / .csv / .parquet",
                file_types=[".json", ".jsonl", ".csv", ".parquet"],
                type="filepath",
                visible=False,
            )
            form["upload"] = gr.State(None)
            with gr.Row():
                form["dataset_config"] = gr.Textbox(label="Hub config", info=field_help("dataset_config"))
                form["dataset_split"] = gr.Textbox(value="train", label="Hub split", info=field_help("dataset_split"))
            with gr.Row():
                form["max_samples"] = gr.Number(value=0, precision=0, label="Max rows", info=field_help("max_samples"))
                form["skip_bad_rows"] = gr.Checkbox(
                    value=False, label="Skip bad rows", info=field_help("skip_bad_rows")
                )
                form["trained_turns"] = gr.Radio(
                    TrainedTurns.values(),
                    value=TrainedTurns.ALL.value,
                    label="Trained assistant turns",
                    info=field_help("trained_turns"),
                )
            form["system_prompt"] = gr.Textbox(label="System prompt", lines=2, info=field_help("system_prompt"))
            parts["preview_btn"] = gr.Button("Preview dataset", variant="primary", elem_id="preview-btn")
        with gr.Column(scale=3):
            parts["summary"] = gr.Markdown(elem_id="dataset-summary")
            parts["histogram"] = gr.Plot(label="Token lengths", elem_id="length-histogram")
    parts["table"] = gr.Dataframe(
        label="Rows in the normalised schema (first 20)", wrap=True, max_height=360, elem_id="dataset-table"
    )
    parts["example"] = gr.HTML(elem_id="mask-example")
    return parts


def inspect_form(values: dict, ctx: AppContext, login: str = ""):
    """The preview for the current form: summary markdown, histogram, table, example HTML.

    ``login`` is the session's Space login token (used when the form's token field is empty)."""
    config = form_to_config(values, ctx.output_root, ctx.data_dirs, ctx.allow_code, login)
    tokenizer = load_tokenizer(config)
    if config.preference.training_method.is_preference:
        return _inspect_preference(config, tokenizer)
    data = prepare_data(config, tokenizer)
    train, evaluation = data.stats["train"], data.stats["eval"] or {}
    truncated = train["truncated_rows"] + evaluation.get("truncated_rows", 0)
    lost = train["answer_lost_rows"] + evaluation.get("answer_lost_rows", 0)
    lines = [
        f"**Source:** `{data.source}`  ",
        f"**Detected format:** `{data.format}` for `{config.data.fine_tuning_type.value}`  ",
        f"**Rows:** {data.stats['rows_read']} read, {data.stats['rows_skipped']} skipped, "
        f"{len(data.train_rows)} train / {len(data.eval_rows)} eval  ",
        f"**Tokens per row:** median {train['median_tokens']}, p95 {train['p95_tokens']}, max {train['max_tokens']}  ",
        f"**At max_seq_length {config.data.max_seq_length}:** {truncated} rows truncated (end of answer cut), "
        f"{lost} rows would lose their whole answer (dropped)",
    ]
    fixes = data.stats.get("turn_fixes") or {}
    if fixes:
        changes = ", ".join(f"{rule.replace('_', ' ')} {n}" for rule, n in fixes.items() if rule != "rows")
        lines.append(f"  \n**Repaired to alternate user/assistant:** {fixes['rows']} conversations ({changes})")
    lines += [f"\n> {note}" for note in data.notes]
    figure = length_histogram(data.lengths, config.data.max_seq_length)
    table = pd.DataFrame(preview_rows(data.train_rows, 20))
    table = table[[c for c in table.columns if table[c].astype(bool).any()]]  # hide columns empty for this format
    table = table.map(lambda v: v if len(v) <= 400 else v[:400] + " …")
    example = data.train_rows[0]
    spans = []
    for text, trained in mask_segments(tokenizer, example, config.data.max_seq_length, config.data.trained_turns):
        css = "at-trained" if trained else "at-masked"
        spans.append(f'<span class="{css}">{html.escape(text)}</span>')
    example_html = (
        '<div class="at-example-legend"><span class="at-masked">masked prompt tokens (no loss)</span> '
        '<span class="at-trained">trained answer tokens</span></div>'
        f'<pre class="at-example" id="mask-example-text">{"".join(spans)}</pre>'
    )
    return "\n".join(lines), figure, table, example_html


def _answer_html(tokenizer, prompt: list[dict], answer: list[dict], max_length: int) -> str:
    """Prompt + answer as the preference trainer tokenises them: masked prompt, trained answer tokens."""
    ids, start = encode_answer(tokenizer, prompt, answer, max_length)
    return (
        f'<span class="at-masked">{html.escape(tokenizer.decode(ids[:start]))}</span>'
        f'<span class="at-trained">{html.escape(tokenizer.decode(ids[start:]))}</span>'
    )


def _inspect_preference(config, tokenizer):
    """The preview of preference data: pairs side by side (chosen vs rejected), trained tokens on both sides."""
    data = prepare_preference_data(config, tokenizer)
    train, paired = data.stats["train"], config.preference.training_method.paired
    lines = [
        f"**Source:** `{data.source}`  ",
        f"**Detected format:** `{data.format}` for `{config.preference.training_method.value}`  ",
        f"**Rows:** {data.stats['rows_read']} read, {data.stats['rows_skipped']} skipped, "
        f"{len(data.train_rows)} train / {len(data.eval_rows)} eval"
        + ("" if paired else f", {train['desirable_rows']} desirable in train")
        + "  ",
        f"**Tokens per row (prompt + longest answer):** median {train['median_tokens']}  ",
        f"**At max_seq_length {config.data.max_seq_length}:** {train['truncated_rows']} train rows have an answer cut",
    ]
    lines += [f"\n> {note}" for note in data.notes]
    figure = length_histogram(data.lengths, config.data.max_seq_length)

    def cut(text: str) -> str:
        return text if len(text) <= 400 else text[:400] + " …"

    rows = []
    for row in data.train_rows[:20]:
        shown = {"prompt": cut(row["prompt"][-1]["content"])}
        if paired:
            shown.update(chosen=cut(row["chosen"][0]["content"]), rejected=cut(row["rejected"][0]["content"]))
        else:
            shown.update(completion=cut(row["completion"][0]["content"]), label=str(row["label"]).lower())
        rows.append(shown)
    table = pd.DataFrame(rows)
    example = data.train_rows[0]
    n = config.data.max_seq_length
    legend = (
        '<div class="at-example-legend"><span class="at-masked">masked prompt tokens (no loss)</span> '
        '<span class="at-trained">trained answer tokens</span></div>'
    )
    if paired:
        sides = [("chosen", example["chosen"]), ("rejected", example["rejected"])]
    else:
        sides = [("desirable" if example["label"] else "undesirable", example["completion"])]
    columns = "".join(
        f'<div class="at-pair-side" style="flex:1;min-width:0"><b>{name}</b><pre class="at-example" id="mask-example-{name}">'
        f"{_answer_html(tokenizer, example['prompt'], answer, n)}</pre></div>"
        for name, answer in sides
    )
    example_html = f'{legend}<div class="at-pair" id="mask-example-text" style="display:flex;gap:1em">{columns}</div>'
    return "\n".join(lines), figure, table, example_html


def wire(ctx: AppContext, form: dict, parts: dict) -> None:
    def on_source(source):
        return gr.update(visible=source == SOURCE_HUB), gr.update(visible=source == SOURCE_UPLOAD)

    form["dataset_source"].change(
        on_source, inputs=form["dataset_source"], outputs=[form["hub_dataset"], parts["upload_file"]]
    )

    def on_upload(path):
        return stage_upload(path, ctx.workspace)

    parts["upload_file"].change(on_upload, inputs=parts["upload_file"], outputs=form["upload"])

    def on_preview(login: gr.OAuthToken | None, *args):  # gradio fills login: see ui/identity.py
        try:
            summary, figure, table, example = inspect_form(dict(zip(FORM_FIELDS, args)), ctx, login_token(login))
            widths = [f"{100 // max(1, len(table.columns))}%"] * len(table.columns)
            return summary, figure, gr.update(value=table, column_widths=widths), example
        except UserError as err:
            return f"**Cannot read the dataset:** {err.message}", None, None, ""

    parts["preview_btn"].click(
        on_preview,
        inputs=[form[name] for name in FORM_FIELDS],
        outputs=[parts["summary"], parts["histogram"], parts["table"], parts["example"]],
    )
