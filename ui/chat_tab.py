"""Tab 6: talk to the fine-tuned model and, side by side, its base model on the same prompt."""

from __future__ import annotations

import gradio as gr

from autotuning.errors import UserError
from autotuning.inference import generate_reply
from autotuning.runs import RunStatus, load_run_config

from .context import AppContext
from .form import session_token
from .identity import login_token
from .run_picker import build_run_picker

__all__ = ["build", "wire", "reply_both"]


def build(ctx: AppContext) -> dict:
    parts: dict = {}
    with gr.Row():
        build_run_picker(ctx, parts, "chat-run", "Fine-tuned run")
    gr.Markdown(
        "Both replies use the tokenizer's chat template. The builtin tiny models have ~1M parameters: their "
        "replies are noise and only show that the pipeline works end to end."
    )
    with gr.Row():
        parts["tuned"] = gr.Chatbot(label="Fine-tuned", height=320, elem_id="chat-tuned")
        parts["base"] = gr.Chatbot(label="Base model", height=320, elem_id="chat-base")
    with gr.Row():
        parts["message"] = gr.Textbox(label="Message", placeholder="Ask something…", scale=5, elem_id="chat-message")
        parts["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        parts["max_new_tokens"] = gr.Slider(8, 512, value=64, step=8, label="Max new tokens")
        parts["temperature"] = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)")
        parts["clear"] = gr.Button("Clear")
    return parts


def reply_both(
    ctx: AppContext,
    run_dir: str,
    message: str,
    tuned_history: list,
    base_history: list,
    max_new_tokens: int,
    temperature: float,
    hf_token: str = "",
):
    """Append the user's message and each model's reply to both histories.

    Both models load through the pipeline (a chat task: the run's merged model under the run's lock, so never
    half-written by an export), with the session's token for a private base model; replies sample from a
    generator of their own, so a training job running beside the chat is not disturbed.
    """
    config = load_run_config(run_dir, hf_token)
    out = []
    for source, history in ((run_dir, tuned_history), (config.model.model_name, base_history)):
        model, tokenizer = load_for_chat(ctx, source, config if source != run_dir else None)
        messages = [{"role": m["role"], "content": m["content"]} for m in history] + [
            {"role": "user", "content": message}
        ]
        reply = generate_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature)
        out.append(
            history + [{"role": "user", "content": message}, {"role": "assistant", "content": reply or "(empty reply)"}]
        )
    return out[0], out[1]


def load_for_chat(ctx: AppContext, source: str, like=None):
    """(model, tokenizer) from the app's model cache, loaded as a pipeline task; a UserError if it fails."""
    task = ctx.pipeline.load_model(ctx.models, source, like)
    task.wait()
    if task.status is not RunStatus.FINISHED:
        raise UserError(task.error or "the model could not be loaded", source, "pick another run")
    return task.result


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio may hand back [{"type": "text", "text": ...}]
        return " ".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    return str(content)


def wire(ctx: AppContext, parts: dict, hf_token: gr.Textbox) -> None:
    """``hf_token`` is the Model & config tab's token field: the base model may be private."""

    def on_send(run_dir, message, tuned, base, max_new_tokens, temperature, typed_token, login: gr.OAuthToken | None):
        if not run_dir:
            raise gr.Error("Pick a finished run first.")
        if not (message or "").strip():
            raise gr.Error("Type a message.")
        tuned = [{"role": m["role"], "content": _text(m["content"])} for m in (tuned or [])]
        base = [{"role": m["role"], "content": _text(m["content"])} for m in (base or [])]
        try:
            token = session_token(typed_token, login_token(login))
            tuned, base = reply_both(
                ctx, run_dir, message.strip(), tuned, base, int(max_new_tokens), float(temperature), token
            )
        except UserError as err:
            raise gr.Error(err.message) from None
        return tuned, base, ""

    inputs = [
        parts["run"],
        parts["message"],
        parts["tuned"],
        parts["base"],
        parts["max_new_tokens"],
        parts["temperature"],
        hf_token,
    ]
    outputs = [parts["tuned"], parts["base"], parts["message"]]
    parts["send"].click(on_send, inputs=inputs, outputs=outputs)
    parts["message"].submit(on_send, inputs=inputs, outputs=outputs)
    parts["clear"].click(lambda: ([], []), outputs=[parts["tuned"], parts["base"]])
