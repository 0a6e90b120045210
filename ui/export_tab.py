"""Tab 5: export a finished run; files, sizes and the verification figures each exporter records; push it to the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd
from huggingface_hub import get_token

from autotuning.config import GgufType, SaveFormat, environment_token_lent, field_help
from autotuning.errors import UserError
from autotuning.export.verify import describe
from autotuning.publish import Part

from .context import AppContext
from .form import session_token
from .identity import login_token
from .jobs import cancel, follow
from .run_picker import build_run_picker

__all__ = ["build", "wire", "export_line", "exports_markdown", "push_markdown", "push_token"]

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


def push_markdown(result: dict) -> str:
    """What a finished push made: the repo, where each part went, the files, and exports pushed unverified."""
    where = ", ".join(f"{part} → `{folder}`" for part, folder in result["uploaded"].items())
    text = (
        f"✅ Pushed to [{result['repo']}]({result['url']}) ({'private' if result['private'] else 'public'} if new): "
        f"{where}; {len(result['files'])} files, {result['bytes'] / 1e6:.1f} MB, commit `{result['commit'][:10]}`."
    )
    if not result.get("card"):
        text += " ⚠️ Without a model card (it could not be made; the app's log says why)."
    for fmt, reason in (result.get("unverified") or {}).items():
        text += f"\n\n⚠️ **{fmt}** was pushed UNVERIFIED: {reason}"
    return text


def push_token(typed: str | None, login: str) -> str:
    """The session's own token (typed, else its Space login); this server's only when it lends it
    (``app.py --lend-hf-token``), as for every other Hub request of a session."""
    token = session_token(typed, login)
    if not token and environment_token_lent():
        token = get_token() or ""
    return token


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
    with gr.Accordion("Push to the Hugging Face Hub", open=False):
        with gr.Row():
            parts["push_repo"] = gr.Textbox(
                label="Repo id",
                placeholder="user/name",
                elem_id="push-repo",
                info="your user or organisation, a slash, a name; created if missing",
            )
            parts["push_what"] = gr.CheckboxGroup(
                [p.value for p in Part],
                value=[Part.MERGED.value],
                label="What",
                elem_id="push-what",
                info="the first of merged, adapter, gguf goes at the repo's root, the others in folders of their name",
            )
            parts["push_public"] = gr.Checkbox(
                False, label="Public", info="a new repo is private unless ticked; an existing one keeps its own"
            )
        gr.Markdown(
            "Uses the token of the **Model & config** tab (it needs write access), or your Space login; a model "
            "card (README.md) goes at the repo's root."
        )
        parts["push"] = gr.Button("Push", elem_id="push-btn")
        parts["push_summary"] = gr.Markdown(elem_id="push-summary")
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

    def on_push(run_dir, repo, what, public, typed_token, login: gr.OAuthToken | None, progress=gr.Progress()):
        """Starts the push task (its id goes to the session, for Cancel), follows it, shows where it went."""
        if not run_dir:
            raise gr.Error("Pick a finished run first.")
        if not what:
            raise gr.Error("Pick at least one part to push.")
        try:
            token = push_token(typed_token, login_token(login))
            task = ctx.pipeline.push(run_dir, repo, what, hf_token=token, private=not public)
        except UserError as err:
            raise gr.Error(err.message) from None
        yield {parts["task"]: task.id}
        yield {parts["push_summary"]: push_markdown(follow(task, progress))}

    parts["push"].click(
        on_push,
        inputs=[parts["run"], parts["push_repo"], parts["push_what"], parts["push_public"], hf_token],
        outputs=[parts["task"], parts["push_summary"]],
    )
