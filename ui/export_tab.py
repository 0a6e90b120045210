"""Tab 5: export a finished run; files, sizes and the verification figures each exporter records."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from autotuning.config import GgufType, SaveFormat, field_help
from autotuning.errors import UserError
from autotuning.export import export_run

from .context import AppContext
from .run_picker import build_run_picker

__all__ = ["build", "wire"]


def build(ctx: AppContext) -> dict:
    parts: dict = {}
    with gr.Row():
        build_run_picker(ctx, parts, "export-run")
    with gr.Row():
        parts["formats"] = gr.CheckboxGroup(
            [f.value for f in SaveFormat],
            value=["torch"],
            label="Formats",
            elem_id="export-formats",
            info="torch: merged safetensors; gguf: llama.cpp / Ollama; tensorflow: SavedModel + .keras",
        )
        parts["gguf_type"] = gr.Dropdown(
            GgufType.values(), value="q8_0", label="GGUF type", info=field_help("gguf_type")
        )
    parts["go"] = gr.Button("Export", variant="primary", elem_id="export-btn")
    parts["summary"] = gr.Markdown(elem_id="export-summary")
    parts["files"] = gr.Dataframe(headers=["file", "bytes"], label="Files", elem_id="export-files")
    parts["figures"] = gr.Code(label="Verification figures", language="json", interactive=False)
    parts["downloads"] = gr.File(label="Download", file_count="multiple", interactive=False)
    return parts


def wire(ctx: AppContext, parts: dict) -> None:

    def on_export(run_dir, formats, gguf_type, progress=gr.Progress()):
        if not run_dir:
            raise gr.Error("Pick a finished run first.")
        if not formats:
            raise gr.Error("Pick at least one format.")
        progress(0.1, desc="exporting, reloading and checking")
        try:
            exports = export_run(run_dir, formats, gguf_type)
        except UserError as err:
            raise gr.Error(err.message) from None
        lines, files = [], []
        for fmt in formats:
            figures = exports[fmt]
            root = Path(figures["path"])
            root = root if root.is_dir() else root.parent
            files += [p for p in sorted(root.rglob("*")) if p.is_file()]
            line = f"**{fmt}** → `{figures['path']}` verified: max |logit diff| {figures['max_abs_logit_diff']:.2e}"
            if fmt == "gguf":
                line += (
                    f" ({figures['type']}, reloaded by transformers' GGUF reader), greedy agreement "
                    f"{figures['greedy_agreement_tokens']}/{figures['greedy_tokens']} tokens, tokenizer ids match "
                    f"{figures['tokenizer_ids_match']}, chat template and EOS present; llama.cpp: {figures['llama_cpp']}"
                )
            elif fmt == "torch":
                line += f" vs {figures['reference']}"
            else:
                line += " (SavedModel reloaded with tf.saved_model.load)"
            lines.append(line)
        table = pd.DataFrame([{"file": str(p.relative_to(Path(run_dir))), "bytes": p.stat().st_size} for p in files])
        downloads = [
            str(p) for p in files if p.suffix in (".gguf", ".safetensors", ".json", ".keras") or p.name == "Modelfile"
        ]
        shown = {k: v for k, v in exports.items() if k in formats}
        return "\n\n".join(lines), table, json.dumps(shown, indent=2, default=str), downloads

    parts["go"].click(
        on_export,
        inputs=[parts["run"], parts["formats"], parts["gguf_type"]],
        outputs=[parts["summary"], parts["files"], parts["figures"], parts["downloads"]],
    )
