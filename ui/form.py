"""Widget values <-> typed Config, in one place.

Every tab registers its config widgets under the config field name they edit (plus a few UI-only
names: ``run_name``, ``dataset_source``, ``hub_dataset``, ``upload``). Handlers receive the values
in :data:`FORM_FIELDS` order and call :func:`form_to_config`; nothing else parses widget values.
"""

from __future__ import annotations

import re
import shlex
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from autotuning.config import QUICKSTART_DATASET, Config, ConfigError, config_from_dict
from autotuning.modeling import BUILTIN_PREFIX
from autotuning.packaged import PACKAGED_PREFIX

__all__ = [
    "FORM_FIELDS",
    "DATASET_SOURCES",
    "SOURCE_QUICKSTART",
    "form_to_config",
    "config_to_form",
    "cli_command",
    "validate_form",
    "stage_upload",
    "session_token",
]

# Dataset source choices shown in the Dataset tab.
SOURCE_BUILTIN = "Built-in dataset for the type (bundled sample when offline)"
SOURCE_SAMPLE = "Bundled sample"
SOURCE_QUICKSTART = "Quickstart sample (templated instructions a tiny model learns in seconds)"
SOURCE_HUB = "Hub dataset id"
SOURCE_UPLOAD = "Upload a file"
DATASET_SOURCES = [SOURCE_QUICKSTART, SOURCE_SAMPLE, SOURCE_BUILTIN, SOURCE_HUB, SOURCE_UPLOAD]

# Config fields edited in the UI, in the order handlers receive them, followed by UI-only fields.
CONFIG_FIELDS = [
    "model_name",
    "trust_remote_code",
    "allow_pickle_weights",
    "hf_token",
    "fine_tuning_type",
    "quantization",
    "peft_type",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "lr_scheduler_type",
    "max_seq_length",
    "eval_split",
    "eval_steps",
    "logging_steps",
    "save_steps",
    "early_stopping_patience",
    "load_best_model_at_end",
    "seed",
    "packing",
    "precision",
    "gradient_checkpointing",
    "fused_lora",
    "liger_kernels",
    "fused_cross_entropy",
    "compile_layers",
    "varlen_attention",
    "distributed",
    "num_processes",
    "save_format",
    "gguf_type",
    "eval_save_format",
    "eval_generations",
    "eval_max_new_tokens",
    "dataset_config",
    "dataset_split",
    "max_samples",
    "system_prompt",
    "trained_turns",
    "skip_bad_rows",
    "training_method",
    "beta",
    "dpo_loss_type",
    "simpo_gamma",
    "desirable_weight",
    "undesirable_weight",
    "best_metric",
    "base_run",
    "report_to",
    "sweep",
    "sweep_method",
    "sweep_trials",
    "sweep_metric",
]
UI_FIELDS = ["run_name", "dataset_source", "hub_dataset", "upload"]
FORM_FIELDS = CONFIG_FIELDS + UI_FIELDS

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


def _run_dir(run_name: str, output_root: Path) -> str:
    name = (run_name or "").strip()
    if not name:
        return ""  # the pipeline picks runs/<timestamp>-<type>
    if not _RUN_NAME.match(name) or ".." in name:
        raise ConfigError(
            f"run name {name!r} is not a plain folder name",
            "field 'run name'",
            "use letters, digits, '.', '-' or '_' (the run is saved under the output root)",
        )
    target = output_root / name
    if target.is_symlink() or not target.resolve().is_relative_to(output_root.resolve()):
        raise ConfigError(
            f"run name {name!r} is a link that leads out of the output root",
            "field 'run name'",
            "pick another name; runs are written only inside the output root",
        )
    return str(target)


def _confined(path_text: str, allowed: list[Path], field: str, fix: str = "") -> str:
    """A local path typed or uploaded in the app, accepted only inside the app's own folders (and --data-dir)."""
    resolved = Path(path_text).expanduser().resolve()
    if any(resolved.is_relative_to(root.resolve()) for root in allowed):
        return str(resolved)
    raise ConfigError(
        "the app reads local files only from its own folders (uploads, the output root) and --data-dir folders",
        f"field '{field}' = {path_text}",
        fix or "upload the file instead, or start the app with --data-dir <folder that holds it>",
    )


def _model_name(text: str, allowed: list[Path]) -> str:
    """A Hub id, builtin: or pkg: name as typed; a local model folder only inside the app's folders."""

    if not text or text.startswith((BUILTIN_PREFIX, PACKAGED_PREFIX)) or not _looks_local(text):
        return text
    return _confined(text, allowed, "model_name", "use a Hub id, or start the app with --data-dir <folder above it>")


CODE_FIX = "the app's owner can start it with --allow-remote-code; the CLI on your own machine always can"


def _check_code_powers(values: dict[str, Any], allow_code: bool) -> None:
    """trust_remote_code runs a model's own Python on the server, pickle weights can too: not for every visitor."""
    for name in ("trust_remote_code", "allow_pickle_weights"):
        if values.get(name) and not allow_code:
            raise ConfigError(
                f"this app does not let browser sessions turn on {name} (it can run code on the server)",
                f"field '{name}'",
                CODE_FIX,
            )


def _looks_local(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or Path(text).expanduser().exists()


def _dataset_path(source: str, hub_id: str, upload: str | None, allowed: list[Path]) -> str:
    if source == SOURCE_SAMPLE:
        return "sample"
    if source == SOURCE_QUICKSTART:
        return QUICKSTART_DATASET
    if source == SOURCE_BUILTIN:
        return ""
    if source == SOURCE_HUB:
        if not (hub_id or "").strip():
            raise ConfigError(
                "no Hub dataset id given", "field 'Hub dataset id'", "type an id such as yahma/alpaca-cleaned"
            )
        hub_id = hub_id.strip()
        return _confined(hub_id, allowed, "Hub dataset id") if _looks_local(hub_id) else hub_id
    if source == SOURCE_UPLOAD:
        if not upload:
            raise ConfigError("no file uploaded", "Dataset tab", "upload a .json, .jsonl, .csv or .parquet file")
        return _confined(str(upload), allowed, "upload")
    raise ConfigError(f"unknown dataset source {source!r}", "Dataset tab", f"pick one of: {', '.join(DATASET_SOURCES)}")


def session_token(typed: str | None, login_token: str = "") -> str:
    """The Hub token a browser session's requests use: the one typed in its form, else its Space login's."""
    return (typed or "").strip() or login_token


def form_to_config(
    values: dict[str, Any],
    output_root: str | Path,
    data_dirs: Sequence[Path] = (),
    allow_code: bool = False,
    login_token: str = "",
) -> Config:
    """The one conversion from widget values to a validated Config (raises ConfigError with the field).

    Local paths are confined: datasets and local model folders only from the output root (uploads are staged in
    its workspace) and ``data_dirs``; runs only inside the output root. trust_remote_code and
    allow_pickle_weights only where the server allows them (``allow_code``: app.py --allow-remote-code).
    The token is the form's, else ``login_token`` (the session's Space login, see ui/identity.py).
    """
    _check_code_powers(values, allow_code)
    data: dict[str, Any] = {"hf_token": session_token(values.get("hf_token"), login_token)}
    for name in CONFIG_FIELDS:
        if name not in values or name == "hf_token":
            continue
        value = values[name]
        if name == "lora_target_modules" and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if name == "save_format" and not value:
            raise ConfigError("no export format selected", "field 'save_format'", "tick at least torch")
        if value is None:
            continue  # an emptied number box: keep the default
        data[name] = value
    allowed = [Path(output_root), *map(Path, data_dirs)]
    if "model_name" in data:
        data["model_name"] = _model_name(str(data["model_name"]), allowed)
    if str(data.get("base_run") or "").strip():
        # A base run is one of the app's own runs: a folder under the output root, by name or path.
        text = str(data["base_run"]).strip()
        path = text if _looks_local(text) else str(Path(output_root) / text)
        data["base_run"] = _confined(path, [Path(output_root)], "base_run", "pick a finished run of this app")
    data["dataset_path"] = _dataset_path(
        values.get("dataset_source", SOURCE_SAMPLE), values.get("hub_dataset", ""), values.get("upload"), allowed
    )
    data["output_dir"] = _run_dir(values.get("run_name", ""), Path(output_root))
    return config_from_dict(data, where="form")


def config_to_form(config: Config) -> dict[str, Any]:
    """Widget values for a Config (used when a YAML file is loaded). The token is never put back."""
    flat = config.to_flat_dict(redact=True)
    values: dict[str, Any] = {name: flat[name] for name in CONFIG_FIELDS if name in flat}
    values["lora_target_modules"] = ", ".join(flat["lora_target_modules"])
    values["sweep"] = _flow_yaml(flat["sweep"]) if flat["sweep"] else ""
    path = config.data.dataset_path
    if path == "sample":
        values.update(dataset_source=SOURCE_SAMPLE, hub_dataset="")
    elif path == QUICKSTART_DATASET:
        values.update(dataset_source=SOURCE_QUICKSTART, hub_dataset="")
    elif not path:
        values.update(dataset_source=SOURCE_BUILTIN, hub_dataset="")
    elif Path(path).exists():
        values.update(dataset_source=SOURCE_UPLOAD, hub_dataset="", upload=path)
    else:
        values.update(dataset_source=SOURCE_HUB, hub_dataset=path)
    values["run_name"] = Path(config.run.output_dir).name if config.run.output_dir else ""
    return values


def cli_command(config: Config) -> str:
    """The equivalent ``python -m autotuning train`` line: every option that differs from the defaults."""

    defaults = Config().to_flat_dict()
    parts = ["python -m autotuning train"]
    for key, value in config.to_flat_dict(redact=True).items():
        if key == "fsdp" or defaults.get(key) == value:  # fsdp mirrors distributed
            continue
        if isinstance(value, dict):
            value = _flow_yaml(value)
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        parts.append(f"--set {shlex.quote(f'{key}={value}')}")
    if config.model.hf_token:
        parts.insert(0, "HF_TOKEN=...")  # the token is never echoed
    return " \\\n    ".join(parts)


def _flow_yaml(value: dict) -> str:
    """A sweep as one line of YAML, as typed in the form and in --set: {learning_rate: [0.0001, 0.0002]}."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()


def validate_form(
    values: dict[str, Any], output_root: str | Path, data_dirs: Sequence[Path] = (), allow_code: bool = False
) -> tuple[Config | None, str]:
    """(config, '') when valid, else (None, the message to show inline)."""
    try:
        return form_to_config(values, output_root, data_dirs, allow_code), ""
    except ConfigError as err:
        return None, err.message


def stage_upload(uploaded: str | None, workspace: Path) -> str | None:
    """Copy an uploaded file into the app's workspace (uploads never stay in a temp dir we don't own).

    Each upload gets a folder of its own, so two sessions uploading a ``data.jsonl`` never train on each other's.
    """
    if not uploaded:
        return None
    src = Path(uploaded)
    target_dir = workspace / "uploads" / uuid.uuid4().hex[:16]
    target_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", src.name)[:100] or "upload.jsonl"
    target = target_dir / safe
    if src.resolve() != target.resolve():
        shutil.copyfile(src, target)
    return str(target)
