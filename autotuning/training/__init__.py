"""Training: TRL SFTTrainer configured from our Config, plus callbacks that stream metric events."""

from .callbacks import FinalCheckpointCallback, MetricsCallback, StopCallback
from .metrics import MetricsSink, read_metrics, truncate_metrics
from .trainer import build_sft_config, build_trainer, last_checkpoint, resume_checkpoint

__all__ = [
    "MetricsSink",
    "MetricsCallback",
    "StopCallback",
    "FinalCheckpointCallback",
    "read_metrics",
    "truncate_metrics",
    "build_sft_config",
    "build_trainer",
    "last_checkpoint",
    "resume_checkpoint",
]
