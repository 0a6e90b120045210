"""Text -> Config: YAML files, ``--set key=value`` overrides, seed-name aliases, flat or grouped keys.

Keys are resolved here: ``ModelName`` -> ``model_name`` (the seed project's CamelCase names), ``lora-r`` ->
``lora_r``, a ``training:`` section or ``training.max_steps`` -> ``max_steps``; an unknown key gets a
did-you-mean hint, and an error says where it came from (the file and line, ``--set``, the UI form). The values
then go to :func:`.schema.build_config`, which coerces each to its field's type and runs every check.

Example::

    cfg = load_config("run.yaml", overrides=["learning_rate=1e-4", "max_steps=50"])
    cfg.training.learning_rate  # 0.0001
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .schema import _FIELDS, _GROUPS, Config, build_config, unknown_option

__all__ = ["SEED_ALIASES", "config_from_dict", "load_config"]


# The seed design's CamelCase keys -> our snake_case field names.
SEED_ALIASES: dict[str, str] = {
    "ModelName": "model_name",
    "FineTuningType": "fine_tuning_type",
    "DatasetPath": "dataset_path",
    "ModelSeqMaxLength": "max_seq_length",
    "QuantizationType4Bit8Bit": "quantization",
    "PeftType": "peft_type",
    "SaveFormat": "save_format",
    "ModelDir": "output_dir",
    "EvalSaveFormat": "eval_save_format",
    "FSDP": "fsdp",
    "HfToken": "hf_token",
}


def _canonical_key(key: str) -> str:
    key = str(key).strip()
    if key in SEED_ALIASES:
        return SEED_ALIASES[key]
    return key.replace("-", "_")


def _unknown_key(key: str, where: str) -> ConfigError:
    return unknown_option(key, where, SEED_ALIASES)


def _flatten(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Accept flat keys, grouped sections and seed aliases; return {field_name: raw value}."""
    flat: dict[str, Any] = {}
    for raw_key, value in data.items():
        if raw_key in _GROUPS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                key = _canonical_key(sub_key)
                if key not in _FIELDS or _FIELDS[key][0] != raw_key:
                    raise _unknown_key(f"{raw_key}.{sub_key}" if key not in _FIELDS else sub_key, where)
                flat[key] = sub_value
            continue
        key = _canonical_key(raw_key)
        if "." in key:  # group.field on the command line
            group, _, key = key.partition(".")
            if group not in _GROUPS or key not in _FIELDS or _FIELDS[key][0] != group:
                raise _unknown_key(raw_key, where)
        if key not in _FIELDS:
            raise _unknown_key(raw_key, where)
        if key in flat and flat[key] != value:
            raise ConfigError(
                f"option '{key}' is given twice with different values ({flat[key]!r} and {value!r})",
                where,
                "keep one of them (seed aliases like ModelName count as the same option)",
            )
        flat[key] = value
    return flat


def config_from_dict(data: dict[str, Any] | None, where: str = "config") -> Config:
    """Build and validate a Config from a flat or grouped dict (YAML, UI form or JSON)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"the config must be a mapping of option: value, got {type(data).__name__}",
            where,
            "write one 'option: value' per line",
        )
    flat = _flatten(data, where)
    try:
        return build_config(flat)
    except ConfigError as err:
        if where != "config" and where not in err.where:
            err.where = f"{where}, {err.where}" if err.where else where
            err.args = (err.message,)
        raise


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            f"--set expects key=value, got {item!r}", "command line", "write e.g. --set learning_rate=1e-4"
        )
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, defaults: dict[str, Any] | None = None
) -> Config:
    """Start from ``defaults`` (optional), read a YAML file (optional), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = dict(_flatten(defaults, "defaults")) if defaults else {}
    where = "config"
    if path:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError("config file not found", str(p), "check the path passed to --config")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError("the config is not valid YAML", f"{p}{line}", "fix the YAML syntax") from None
        except UnicodeDecodeError:
            raise ConfigError("the config is not UTF-8 text", str(p), "save it as UTF-8") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                "the config must be a mapping of option: value", str(p), "write one 'option: value' per line"
            )
        data.update(_flatten(loaded, where))
    for item in overrides or []:
        key, value = _parse_override(item)
        canonical = _flatten({key: value}, "--set")
        data.update(canonical)
    return config_from_dict(data, where=where)
