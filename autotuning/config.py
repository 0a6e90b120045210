"""Every option of a run, typed and validated in one place.

The same :class:`Config` backs the YAML file, the CLI's ``--set key=value`` flags and (later)
the UI form. Options live in one dataclass per group (model, data, peft, quantization,
training, evaluation, export, run); every field name is unique across groups, so a YAML file
may be flat (``learning_rate: 1e-4``) or grouped (``training: {learning_rate: 1e-4}``), and a
CLI flag never needs the group.

The seed project's CamelCase keys (``ModelName``, ``PeftType``, ...) are accepted as aliases.
The Hugging Face token is a secret: it is read from the config or ``HF_TOKEN`` but never
written to a file, a log or a printed config.

Example::

    cfg = load_config("run.yaml", overrides=["learning_rate=1e-4", "max_steps=50"])
    cfg.training.learning_rate  # 0.0001
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

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
    "ModelConfig",
    "DataConfig",
    "PeftConfig",
    "QuantizationConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "ExportConfig",
    "RunConfig",
    "Config",
    "SEED_ALIASES",
    "load_config",
    "config_from_dict",
    "quickstart_overrides",
    "field_help",
    "iter_fields",
]


# --------------------------------------------------------------------------- choices


class _Choice(str, enum.Enum):
    """A string enum that prints as its value (so YAML and messages show ``lora``, not ``PeftType.LORA``)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


class FineTuningType(_Choice):
    INSTRUCTION = "instruction_fine_tuning"
    CODE = "code_generation"
    CHAT = "chat_fine_tuning"
    QA = "question_answering"
    RAG = "rag_fine_tuning"


class Quantization(_Choice):
    NONE = "none"
    INT4 = "4bit"
    INT8 = "8bit"


class PeftType(_Choice):
    LORA = "lora"
    QLORA = "qlora"
    NONE = "none"  # full fine-tune


class SaveFormat(_Choice):
    TORCH = "torch"
    TENSORFLOW = "tensorflow"
    GGUF = "gguf"


class GgufType(_Choice):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_K_M = "q4_k_m"
    Q5_K_M = "q5_k_m"
    Q6_K = "q6_k"


class EvalSaveFormat(_Choice):
    JSON = "json"
    CSV = "csv"


class Precision(_Choice):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Distributed(_Choice):
    NONE = "none"  # one process (one GPU, or the CPU)
    DDP = "ddp"  # one process per device, each a full replica (gloo on CPU, nccl on GPUs)
    FSDP = "fsdp"  # one process per GPU, parameters/gradients/optimizer state sharded (GPUs only)


class SchedulerType(_Choice):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


# Short spellings people type on the command line; matched after lower-casing.
_CHOICE_SYNONYMS: dict[type[_Choice], dict[str, str]] = {
    FineTuningType: {
        "instruction": "instruction_fine_tuning",
        "code": "code_generation",
        "chat": "chat_fine_tuning",
        "qa": "question_answering",
        "rag": "rag_fine_tuning",
    },
    Quantization: {"4-bit": "4bit", "int4": "4bit", "nf4": "4bit", "8-bit": "8bit", "int8": "8bit", "no": "none"},
    PeftType: {"full": "none"},
    SaveFormat: {"pytorch": "torch", "safetensors": "torch", "tf": "tensorflow"},
    Distributed: {"no": "none", "single": "none", "multi_gpu": "ddp"},
}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


# --------------------------------------------------------------------------- groups


@dataclass
class ModelConfig:
    model_name: str = _help(
        "Base model: 'builtin:tiny-llama' | 'builtin:tiny-gpt2' | 'builtin:tiny-qwen2' (built locally, offline), "
        "a Hugging Face Hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or a local model directory.",
        default="builtin:tiny-llama",
    )
    trust_remote_code: bool = _help(
        "Run model code shipped in the Hub repo. Off by default: turn on only for repos you trust.", default=False
    )
    allow_pickle_weights: bool = _help(
        "Load weights saved with pickle (.bin/.pt), which can run arbitrary code when loaded. Off by default: "
        "only safetensors weights are loaded. Turn on only for models you trust.",
        default=False,
    )
    hf_token: str = _help(
        "Hugging Face token for gated/private models and datasets. Never written to disk or logs; "
        "defaults to the HF_TOKEN environment variable.",
        default="",
        repr=False,
    )

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ConfigError(
                "model_name is empty", "field 'model_name'", "give a Hub id, a local directory or builtin:tiny-llama"
            )
        self.model_name = self.model_name.strip()


@dataclass
class DataConfig:
    fine_tuning_type: FineTuningType = _help(
        "What the model learns: " + ", ".join(FineTuningType.values()) + ". Decides the accepted dataset formats "
        "and how prompts are built.",
        default=FineTuningType.INSTRUCTION,
    )
    dataset_path: str = _help(
        "Local .json/.jsonl/.csv/.parquet file or directory, a Hub dataset id, or 'sample' for the bundled sample "
        "of the fine-tuning type. Empty = the type's built-in Hub dataset (bundled sample when offline).",
        default="",
    )
    dataset_config: str = _help("Hub dataset configuration name (e.g. 'v2.1' for microsoft/ms_marco).", default="")
    dataset_split: str = _help("Split to read from a Hub dataset.", default="train")
    max_samples: int = _help("Use at most this many rows (after shuffling with the seed). 0 = all rows.", default=0)
    max_seq_length: int = _help(
        "Longest token sequence (prompt + answer). Longer rows are truncated at the end; rows whose prompt alone "
        "fills it would lose the whole answer and are dropped and counted.",
        default=512,
    )
    eval_split: float = _help(
        "Fraction of rows held out for evaluation (deterministic with the seed). 0 = no evaluation.", default=0.1
    )
    system_prompt: str = _help(
        "Optional system message put before every prompt (conversations that have their own keep it).", default=""
    )
    skip_bad_rows: bool = _help(
        "Skip rows that cannot be converted (reported with a count) instead of stopping at the first one.",
        default=False,
    )

    def __post_init__(self) -> None:
        if self.max_seq_length <= 0:
            raise ConfigError(
                f"max_seq_length must be a positive number of tokens, got {self.max_seq_length}",
                "field 'max_seq_length'",
                "use e.g. 512 or 2048",
            )
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(
                f"eval_split must be in [0, 1), got {self.eval_split}",
                "field 'eval_split'",
                "use e.g. 0.1 to hold out 10% of rows, or 0 to skip evaluation",
            )
        if self.max_samples < 0:
            raise ConfigError(
                f"max_samples must be >= 0, got {self.max_samples}", "field 'max_samples'", "use 0 for all rows"
            )
        self.dataset_path = self.dataset_path.strip()


@dataclass
class PeftConfig:
    peft_type: PeftType = _help(
        "lora = train small adapters on a frozen base; qlora = lora on a 4-bit base (needs quantization: 4bit); "
        "none = full fine-tune of every weight.",
        default=PeftType.LORA,
    )
    lora_r: int = _help("LoRA rank: adapter capacity. 8-64 is typical; higher = more parameters.", default=16)
    lora_alpha: int = _help("LoRA scaling numerator (effective scale = alpha / r). Commonly 2 x r.", default=32)
    lora_dropout: float = _help(
        "Dropout on the LoRA path (0.0-0.1 is typical). 0 by default: on CPU the dropout masks cost ~25% of a "
        "step's time (bench/throughput.py), and short fine-tunes rarely need it.",
        default=0.0,
    )
    lora_target_modules: list[str] = _help(
        "Modules that get adapters: ['all-linear'] (every linear layer but the output head) or names such as "
        "['q_proj', 'v_proj'].",
        default_factory=lambda: ["all-linear"],
    )

    def __post_init__(self) -> None:
        if self.lora_r <= 0:
            raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}", "field 'lora_r'", "use e.g. 8, 16 or 32")
        if self.lora_alpha <= 0:
            raise ConfigError(
                f"lora_alpha must be >= 1, got {self.lora_alpha}", "field 'lora_alpha'", "use e.g. 2 x lora_r"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(
                f"lora_dropout must be in [0, 1), got {self.lora_dropout}", "field 'lora_dropout'", "use e.g. 0.05"
            )
        if not self.lora_target_modules:
            raise ConfigError(
                "lora_target_modules is empty", "field 'lora_target_modules'", "use ['all-linear'] or module names"
            )


@dataclass
class QuantizationConfig:
    quantization: Quantization = _help(
        "Load the base model in 4-bit (nf4, double quantization) or 8-bit with bitsandbytes, or 'none'. "
        "4-bit is what makes qlora; 8-bit works with lora.",
        default=Quantization.NONE,
    )
    bnb_4bit_compute_dtype: Precision = _help(
        "Compute dtype for 4-bit layers: auto (bf16 where supported, else fp32), bf16, fp16 or fp32.",
        default=Precision.AUTO,
    )


@dataclass
class TrainingConfig:
    num_train_epochs: float = _help("Passes over the training rows (ignored when max_steps > 0).", default=3.0)
    max_steps: int = _help("Stop after this many optimizer steps; -1 = run num_train_epochs.", default=-1)
    learning_rate: float = _help("Peak learning rate. ~2e-4 for LoRA, ~2e-5 for a full fine-tune.", default=2e-4)
    per_device_train_batch_size: int = _help("Rows per forward pass on each device.", default=4)
    per_device_eval_batch_size: int = _help("Rows per forward pass during evaluation.", default=8)
    gradient_accumulation_steps: int = _help(
        "Forward passes summed per optimizer step: effective batch = batch size x this x devices.", default=1
    )
    warmup_ratio: float = _help("Fraction of steps spent warming the learning rate up from 0.", default=0.03)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    lr_scheduler_type: SchedulerType = _help(
        "Learning-rate schedule after warm-up: " + ", ".join(SchedulerType.values()) + ".",
        default=SchedulerType.COSINE,
    )
    max_grad_norm: float = _help("Clip gradients to this norm (0 = no clipping).", default=1.0)
    seed: int = _help("Seed for the split, shuffling and initialisation: same seed, same run.", default=42)
    packing: bool = _help(
        "Pack several rows into each sequence without padding (padding-free; loss still only on answers). "
        "Faster on datasets of short rows.",
        default=False,
    )
    group_by_length: bool = _help(
        "Batch rows of similar length together (still shuffled in groups), so batches carry little padding. "
        "Ignored with packing, which has no padding at all.",
        default=True,
    )
    logging_steps: int = _help("Log loss, learning rate and throughput every N steps.", default=5)
    eval_steps: int = _help("Evaluate on the held-out rows every N steps; 0 = only at the end.", default=0)
    save_steps: int = _help("Save a resumable checkpoint every N steps (and always at the end or on stop).", default=50)
    save_total_limit: int = _help("Keep at most this many checkpoints (oldest deleted first).", default=2)
    precision: Precision = _help(
        "Training precision: auto (bf16 on GPUs and CPUs that support it, else fp32), fp32, bf16 or fp16 (GPU).",
        default=Precision.AUTO,
    )
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass: less memory, ~30% slower.", default=False
    )
    early_stopping_patience: int = _help(
        "Stop when the eval loss has not improved for this many evaluations (needs eval_steps > 0). 0 = off.",
        default=0,
    )
    early_stopping_threshold: float = _help(
        "Smallest eval-loss decrease that counts as an improvement for early stopping.", default=0.0
    )
    load_best_model_at_end: bool = _help(
        "After training, restore the checkpoint with the lowest eval loss (needs eval_steps > 0; a checkpoint is "
        "then saved at every evaluation).",
        default=False,
    )
    distributed: Distributed = _help(
        "Multi-process training through 'accelerate launch': none (one process), ddp (a full replica per device; "
        "works on CPU with gloo) or fsdp (shard the model across GPUs; needs CUDA GPUs).",
        default=Distributed.NONE,
    )
    num_processes: int = _help(
        "Processes for ddp/fsdp: 0 = one per visible GPU (on a CPU-only machine set it, e.g. 2).", default=0
    )
    fsdp: bool = _help("The seed's spelling of distributed: fsdp (kept in sync with it).", default=False)
    resume: bool = _help(
        "Continue the run in output_dir from its last complete checkpoint (same step counter and optimizer state).",
        default=False,
    )

    def __post_init__(self) -> None:
        positive = {
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "per_device_eval_batch_size": self.per_device_eval_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be >= 1, got {value}", f"field '{name}'", "use a positive integer")
        if self.learning_rate <= 0:
            raise ConfigError(
                f"learning_rate must be > 0, got {self.learning_rate}", "field 'learning_rate'", "use e.g. 2e-4"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"max_steps must be -1 (use num_train_epochs) or >= 1, got {self.max_steps}",
                "field 'max_steps'",
                "use -1 or a positive step count",
            )
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(
                f"num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs}",
                "field 'num_train_epochs'",
                "use e.g. 3, or set max_steps",
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(
                f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", "field 'warmup_ratio'", "use e.g. 0.03"
            )
        if self.eval_steps < 0:
            raise ConfigError(
                f"eval_steps must be >= 0, got {self.eval_steps}", "field 'eval_steps'", "use 0 to evaluate at the end"
            )
        if self.early_stopping_patience < 0 or self.early_stopping_threshold < 0:
            raise ConfigError(
                "early_stopping_patience and early_stopping_threshold must be >= 0",
                "fields 'early_stopping_patience'/'early_stopping_threshold'",
                "use 0 to turn early stopping off",
            )
        if self.fsdp and self.distributed is Distributed.DDP:
            raise ConfigError(
                "fsdp: true asks for FSDP but distributed is 'ddp'",
                "fields 'fsdp'/'distributed'",
                "set distributed: fsdp (and drop fsdp), or fsdp: false",
            )
        if self.fsdp:
            self.distributed = Distributed.FSDP
        self.fsdp = self.distributed is Distributed.FSDP
        if self.num_processes < 0:
            raise ConfigError(
                f"num_processes must be >= 0, got {self.num_processes}",
                "field 'num_processes'",
                "use 0 for one process per GPU, or a count such as 2",
            )
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(
                "weight_decay and max_grad_norm must be >= 0",
                "fields 'weight_decay'/'max_grad_norm'",
                "use 0 to turn them off",
            )


@dataclass
class EvaluationConfig:
    eval_save_format: EvalSaveFormat = _help(
        "File format of the saved evaluation results: eval_results.json or eval_results.csv.",
        default=EvalSaveFormat.JSON,
    )
    eval_generations: int = _help(
        "At the end of training, the base and the fine-tuned model answer this many held-out rows (greedy, with the "
        "chat template) and task metrics are computed on the answers: exact match and F1 (QA/RAG), multiple-choice "
        "accuracy, ROUGE-L, whether code parses. 0 = skip.",
        default=32,
    )
    eval_max_new_tokens: int = _help("Length limit of each generated answer (tokens).", default=128)

    def __post_init__(self) -> None:
        if self.eval_generations < 0 or self.eval_max_new_tokens < 1:
            raise ConfigError(
                "eval_generations must be >= 0 and eval_max_new_tokens >= 1",
                "fields 'eval_generations'/'eval_max_new_tokens'",
                "use e.g. eval_generations: 32, eval_max_new_tokens: 128",
            )


@dataclass
class ExportConfig:
    save_format: list[SaveFormat] = _help(
        "Export formats after training, one or more of: torch (merged safetensors + tokenizer), tensorflow "
        "(SavedModel + .keras), gguf (llama.cpp / Ollama). Every export is reloaded and checked; tensorflow and gguf "
        "start from the merged torch export, which is always written.",
        default_factory=lambda: [SaveFormat.TORCH],
    )

    gguf_type: GgufType = _help(
        "GGUF tensor type: f32 (exact), f16, bf16, q8_0 (about 1/4 of f32, near-lossless); q4_k_m, q5_k_m, q6_k "
        "need the optional llama-cpp-python package.",
        default=GgufType.Q8_0,
    )

    def __post_init__(self) -> None:
        if not self.save_format:
            raise ConfigError("save_format is empty", "field 'save_format'", "use e.g. [torch]")
        deduped: list[SaveFormat] = []
        for fmt in self.save_format:
            if fmt not in deduped:
                deduped.append(fmt)
        self.save_format = deduped


@dataclass
class RunConfig:
    output_dir: str = _help(
        "Run directory for checkpoints, metrics, results and exports. Empty = runs/<timestamp>-<type>.", default=""
    )
    overwrite_output_dir: bool = _help(
        "Allow starting a new run in a directory that already holds one (its files are replaced).", default=False
    )


_GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "peft": PeftConfig,
    "quantization": QuantizationConfig,
    "training": TrainingConfig,
    "evaluation": EvaluationConfig,
    "export": ExportConfig,
    "run": RunConfig,
}

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

SECRET_FIELDS = frozenset({"hf_token"})
REDACTED = "***"


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for group, cls in _GROUPS.items():
        for f in dataclasses.fields(cls):
            if f.name in index:  # a programming error, caught at import
                raise RuntimeError(f"config field {f.name!r} is defined in two groups")
            index[f.name] = (group, f)
    return index


_FIELDS = _field_index()


def iter_fields() -> list[tuple[str, dataclasses.Field]]:
    """(group, field) for every option, in declaration order: for docs, the UI and ``--help``."""
    return [(group, f) for group, cls in _GROUPS.items() for f in dataclasses.fields(cls)]


def field_help(name: str) -> str:
    return _FIELDS[name][1].metadata["help"]


# --------------------------------------------------------------------------- coercion


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a ConfigError naming the field."""
    where = f"field '{name}'"
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.strip("[]").split(",")) if v]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(name, item_type, v) for v in value]
    if isinstance(annotation, type) and issubclass(annotation, _Choice):
        if isinstance(value, annotation):
            return value
        text = str(value).strip().lower()
        text = _CHOICE_SYNONYMS.get(annotation, {}).get(text, text)
        try:
            return annotation(text)
        except ValueError:
            close = [v for v in annotation.values() if v.startswith(text)] if text else []
            close = close or difflib.get_close_matches(text, annotation.values(), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown value {value!r}",
                where,
                f"{hint}valid values: {', '.join(annotation.values())}",
            ) from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"true", "yes", "1", "on"}:
            return True
        if text in {"false", "no", "0", "off"}:
            return False
        raise ConfigError(f"expected true or false, got {value!r}", where, "use true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected a whole number, got {value!r}", where, "use e.g. 8")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"expected a whole number, got {value!r}", where, "use e.g. 8") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}", where, "use e.g. 0.1 or 2e-4")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number, got {value!r}", where, "use e.g. 0.1 or 2e-4") from None
    if annotation is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"expected text, got {type(value).__name__}", where, "use a plain string")
        return str(value)
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")  # programming error


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=globals())


def _canonical_key(key: str) -> str:
    key = str(key).strip()
    if key in SEED_ALIASES:
        return SEED_ALIASES[key]
    return key.replace("-", "_")


def _unknown_key(key: str, where: str) -> ConfigError:
    candidates = list(_FIELDS) + list(_GROUPS) + list(SEED_ALIASES)
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = f"did you mean '{_canonical_key(close[0])}'? " if close else ""
    return ConfigError(
        f"unknown option '{key}'",
        where,
        f"{hint}run 'python -m autotuning options' to list every option",
    )


# --------------------------------------------------------------------------- the config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not self.model.hf_token:
            self.model.hf_token = os.environ.get("HF_TOKEN", "")
        self._check_combinations()

    def _check_combinations(self) -> None:
        peft, quant = self.peft.peft_type, self.quantization.quantization
        if peft is PeftType.QLORA and quant is not Quantization.INT4:
            raise ConfigError(
                f"peft_type 'qlora' means LoRA on a 4-bit base, but quantization is '{quant}'",
                "fields 'peft_type'/'quantization'",
                "set quantization: 4bit, or use peft_type: lora",
            )
        t = self.training
        if (t.early_stopping_patience or t.load_best_model_at_end) and (t.eval_steps == 0 or self.data.eval_split == 0):
            field = "early_stopping_patience" if t.early_stopping_patience else "load_best_model_at_end"
            raise ConfigError(
                f"{field} compares evaluations during training, but eval_steps is {t.eval_steps} and eval_split is "
                f"{self.data.eval_split}",
                f"fields '{field}'/'eval_steps'/'eval_split'",
                "set eval_steps > 0 and eval_split > 0",
            )
        if t.distributed is Distributed.FSDP and quant is not Quantization.NONE:
            raise ConfigError(
                f"FSDP cannot shard a {quant} bitsandbytes model in this version",
                "fields 'distributed'/'quantization'",
                "use distributed: ddp for QLoRA on several GPUs, or quantization: none with fsdp",
            )
        if peft is PeftType.NONE and quant is not Quantization.NONE:
            raise ConfigError(
                f"a full fine-tune (peft_type 'none') cannot train a {quant} quantized model",
                "fields 'peft_type'/'quantization'",
                "use peft_type: lora (or qlora for 4bit), or quantization: none",
            )

    # -- access by flat field name ------------------------------------------------------

    def get(self, name: str) -> Any:
        group, _ = _FIELDS[name]
        return getattr(getattr(self, group), name)

    def to_dict(self, redact: bool = True) -> dict[str, dict[str, Any]]:
        """Grouped plain-Python dict (enums as strings). Secrets are dropped unless ``redact=False``."""
        out: dict[str, dict[str, Any]] = {}
        for group in _GROUPS:
            values = {}
            for f in dataclasses.fields(getattr(self, group)):
                value = getattr(getattr(self, group), f.name)
                if f.name in SECRET_FIELDS:
                    if redact:
                        continue
                if isinstance(value, list):
                    value = [str(v) if isinstance(v, _Choice) else v for v in value]
                elif isinstance(value, _Choice):
                    value = value.value
                values[f.name] = value
            out[group] = values
        return out

    def to_flat_dict(self, redact: bool = True) -> dict[str, Any]:
        return {k: v for group in self.to_dict(redact).values() for k, v in group.items()}

    def to_yaml(self) -> str:
        """YAML text of the config, grouped, without the token."""
        return yaml.safe_dump(self.to_dict(redact=True), sort_keys=False, allow_unicode=True)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    def replace(self, **changes: Any) -> Config:
        """A new validated Config with some fields changed by flat name."""
        data = self.to_flat_dict(redact=False)
        if "distributed" in changes and "fsdp" not in changes:
            data.pop("fsdp")  # derived from distributed; the stale value would override the change
        data.update(changes)
        return config_from_dict(data)

    def __repr__(self) -> str:
        token = REDACTED if self.model.hf_token else ""
        return f"Config({self.to_flat_dict()!r}, hf_token={token!r})"


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
    kwargs: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
    try:
        for name, value in flat.items():
            group, _ = _FIELDS[name]
            annotation = _resolved_types(_GROUPS[group])[name]
            kwargs[group][name] = _coerce(name, annotation, value)
        groups = {group: cls(**kwargs[group]) for group, cls in _GROUPS.items()}
        return Config(**groups)
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


def quickstart_overrides() -> dict[str, Any]:
    """The offline default run: tiny builtin model, bundled instruction sample, a few dozen steps.

    Used by ``python -m autotuning train`` without ``--config``. Real runs keep the normal defaults.
    """
    return {
        "model_name": "builtin:tiny-llama",
        "fine_tuning_type": "instruction_fine_tuning",
        "dataset_path": "sample",
        "max_seq_length": 256,
        "max_steps": 40,
        "learning_rate": 2e-3,
        "per_device_train_batch_size": 8,
        "logging_steps": 2,
        "eval_steps": 20,
        "save_steps": 20,
        # Base vs tuned answers on 8 held-out rows keeps the quickstart quick; real runs default to 32.
        "eval_generations": 8,
        "eval_max_new_tokens": 48,
    }
