"""Training: TRL SFTTrainer configured from our Config, plus callbacks that stream metric events."""

from .callbacks import FinalCheckpointCallback, MetricsCallback, StopCallback
from .trainer import build_sft_config, build_trainer

__all__ = [
    "MetricsCallback",
    "StopCallback",
    "FinalCheckpointCallback",
    "build_sft_config",
    "build_trainer",
]
