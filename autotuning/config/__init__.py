"""Every option of a run, typed and validated in one place.

The same :class:`Config` backs the YAML file, the CLI's ``--set key=value`` flags and the UI form. Options
live in one dataclass per group (model, data, peft, quantization, training, preference, evaluation, export, search,
run); every
field name is unique across groups, so a YAML file may be flat (``learning_rate: 1e-4``) or grouped
(``training: {learning_rate: 1e-4}``), and a CLI flag never needs the group.

The seed project's CamelCase keys (``ModelName``, ``PeftType``, ...) are accepted as aliases.
The Hugging Face token is a secret: it is read from the config or ``HF_TOKEN`` but never
written to a file, a log or a printed config.

Two modules, split where text meets types (``loading`` imports ``schema``, never the reverse):

- :mod:`.schema`: what a run is: choices, groups, defaults, help, the checks, :class:`Config` and its YAML out.
- :mod:`.loading`: text -> Config: YAML files, ``--set`` overrides, seed aliases, errors naming where.

Example::

    cfg = load_config("run.yaml", overrides=["learning_rate=1e-4", "max_steps=50"])
    cfg.training.learning_rate  # 0.0001
"""

from __future__ import annotations

# Imported from here by ui/form.py and tests since this was one module; the redundant aliases re-export them.
from ..errors import ConfigError as ConfigError
from .loading import SEED_ALIASES, config_from_dict, load_config
from .schema import _ENVIRONMENT_TOKEN as _ENVIRONMENT_TOKEN  # tests switch the token lending with monkeypatch
from .schema import (
    DEFAULT_BETA,
    QUICKSTART_DATASET,
    SWEEP_METRICS,
    BestMetric,
    Config,
    DataConfig,
    Distributed,
    DpoLossType,
    EvalSaveFormat,
    EvaluationConfig,
    ExportConfig,
    FineTuningType,
    GgufType,
    ModelConfig,
    PeftConfig,
    PeftType,
    Precision,
    PreferenceConfig,
    Quantization,
    QuantizationConfig,
    RdzvBackend,
    ReportTo,
    RunConfig,
    SaveFormat,
    SchedulerType,
    SweepConfig,
    SweepMethod,
    TrainedTurns,
    TrainingConfig,
    TrainingMethod,
    field_help,
    iter_fields,
    lower_is_better,
    quickstart_overrides,
)
from .schema import REDACTED as REDACTED
from .schema import SECRET_FIELDS as SECRET_FIELDS
from .schema import environment_token_lent as environment_token_lent  # the launcher: lend the env token?
from .schema import lend_environment_token as lend_environment_token  # app.py, at start-up

__all__ = [
    "FineTuningType",
    "Quantization",
    "PeftType",
    "SaveFormat",
    "GgufType",
    "EvalSaveFormat",
    "Precision",
    "SchedulerType",
    "Distributed",
    "RdzvBackend",
    "ReportTo",
    "TrainedTurns",
    "TrainingMethod",
    "DpoLossType",
    "BestMetric",
    "DEFAULT_BETA",
    "ModelConfig",
    "DataConfig",
    "PeftConfig",
    "QuantizationConfig",
    "TrainingConfig",
    "PreferenceConfig",
    "EvaluationConfig",
    "ExportConfig",
    "SweepConfig",
    "SweepMethod",
    "SWEEP_METRICS",
    "lower_is_better",
    "RunConfig",
    "Config",
    "SEED_ALIASES",
    "load_config",
    "config_from_dict",
    "quickstart_overrides",
    "QUICKSTART_DATASET",
    "field_help",
    "iter_fields",
]
