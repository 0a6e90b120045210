"""Tab 5: export a finished run; files, sizes and the verification figures each exporter records."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from autotuning.config import GgufType, SaveFormat, field_help
from autotuning.errors import UserError
from autotuning.export.verify import describe

from .context import AppContext
from .form import session_token
from .identity import login_token
from .jobs import cancel, follow
from .run_picker import build_run_picker

__all__ = ["build", "wire", "export_line", "exports_markdown"]

_READER = {
    "torch": "reloaded with AutoModelForCausalLM",
    "gguf": "run in llama.cpp",
    "tensorflow": "SavedModel reloaded with tf.saved_model.load",
}


def export_line(fmt: str, figures: dict) -> str:
    """One Markdown paragraph per export: verified with its figures, or UNVERIFIED / failed with the reason
    and where the files are kept (also used by the Train tab for a finished run)."""
    status = figures.get("status", "verified")
    where = f"`{figures['path']}`" if figures.get("path") else "no files"
    if status == "verified":
        text = f"✅ **{fmt}** → {where} verified ({_READER.get(fmt, 'reloaded')}): {describe(figures)}"
    elif status == "unverified":
        text = (
            f"⚠️ **{fmt} UNVERIFIED** → kept in {where} with an UNVERIFIED note: {figures.get('reason')}. "
            f"Figures: {describe(figures)}. Export it again here or with "
            f"`python -m autotuning export --run <run> --format {fmt}`; one that passes its check replaces it."
        )
    else:
        text = f"⛔ **{fmt} {status}**: {figures.get('reason')}. The training is intact: export it again here."
    if fmt == "gguf" and "tokenizer_ids_match" in figures:
        if "chat_prompt_ids_match" in figures:
            stops = figures.get("end_of_turn_stops") or {}
            text += (
                f" llama.cpp: tokenizer ids match {figures['tokenizer_ids_match']}, chat template in the file "
                f"{figures.get('chat_template_present')}, chat prompt ids match {figures['chat_prompt_ids_match']}, "
                f"stops at the end of a turn {bool(stops) and all(stops.values())}."
            )
        else:  # records written before llama.cpp's converter (a second reader's figures under llama_cpp)
            cpp = figures.get("llama_cpp") or {}
            cpp = cpp if isinstance(cpp, dict) else {"status": cpp}
            text += (
                f" Tokenizer ids match {figures['tokenizer_ids_match']}, chat template "
                f"{figures.get('chat_template_present')}, EOS {figures.get('eos_matches')}; llama.cpp: "
                + (describe(cpp) if "rel_logit_diff" in cpp else str(cpp.get("status", cpp)))
            )
    return text


def exports_markdown(exports: dict) -> str:
    """Every export of a run, one paragraph each (the Train tab's result)."""
    return "\n\n".join(export_line(fmt, figures) for fmt, figures in exports.items() if isinstance(figures, dict))


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
            GgufType.values(), value=["q8_0"], multiselect=True, label="GGUF types", info=field_help("gguf_type")
        )
    with gr.Row():
        parts["go"] = gr.Button("Export", variant="primary", elem_id="export-btn")
        parts["cancel"] = gr.Button("Cancel", elem_id="export-cancel")
    parts["task"] = gr.State(None)  # this session's export task, for Cancel
    parts["summary"] = gr.Markdown(elem_id="export-summary")
    parts["files"] = gr.Dataframe(headers=["file", "bytes"], label="Files", elem_id="export-files")
    parts["figures"] = gr.Code(label="Verification figures", language="json", interactive=False)
    parts["downloads"] = gr.File(label="Download", file_count="multiple", interactive=False)
    return parts


def wire(ctx: AppContext, parts: dict, hf_token: gr.Textbox) -> None:
    """``hf_token`` is the Model & config tab's token field: merging re-reads the base model, which may be private."""

    def on_export(run_dir, formats, gguf_type, typed_token, login: gr.OAuthToken | None, progress=gr.Progress()):
        """Starts the export task, hands its id to the session (for Cancel), follows it, shows what it made."""
        if not run_dir:
            raise gr.Error("Pick a finished run first.")
        if not formats:
            raise gr.Error("Pick at least one format.")
        try:
            token = session_token(typed_token, login_token(login))
            task = ctx.pipeline.export(run_dir, formats, gguf_type, hf_token=token)
        except UserError as err:
            raise gr.Error(err.message) from None
        yield {parts["task"]: task.id}
        yield dict(zip(shown_outputs, _shown(run_dir, formats, follow(task, progress))))

    def _shown(run_dir, formats, exports):
        lines, files = [], []
        done = [key for key in exports if key.split(":")[0] in formats]  # gguf:<type> for each further GGUF type
        for fmt in done:
            figures = exports[fmt]
            lines.append(export_line(fmt, figures))
            if not figures.get("path"):
                continue
            root = Path(figures["path"])
            root = root if root.is_dir() else root.parent
            files += [p for p in sorted(root.rglob("*")) if p.is_file() and p not in files]
        table = pd.DataFrame([{"file": str(p.relative_to(Path(run_dir))), "bytes": p.stat().st_size} for p in files])
        downloads = [
            str(p)
            for p in files
            if p.suffix in (".gguf", ".safetensors", ".json", ".keras") or p.name.startswith("Modelfile")
        ]
        shown = {k: v for k, v in exports.items() if k in done}
        return "\n\n".join(lines), table, json.dumps(shown, indent=2, default=str), downloads

    shown_outputs = [parts["summary"], parts["files"], parts["figures"], parts["downloads"]]
    parts["go"].click(
        on_export,
        inputs=[parts["run"], parts["formats"], parts["gguf_type"], hf_token],
        outputs=[parts["task"], *shown_outputs],
    )
    parts["cancel"].click(lambda task_id: cancel(ctx, task_id), inputs=parts["task"], outputs=parts["summary"])
