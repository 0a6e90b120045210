"""Trainer checkpoints inside a run: ``checkpoints/checkpoint-<step>/``, complete once trainer_state.json is written."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError

__all__ = ["checkpoint_step", "last_checkpoint", "resume_checkpoint"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str | Path) -> int:
    """The global step a checkpoint folder was saved at (``checkpoint-120`` -> 120)."""
    match = _CHECKPOINT.match(Path(path).name)
    if match is None:
        raise ValueError(f"not a checkpoint folder name: {Path(path).name}")
    return int(match.group(1))


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest *complete* checkpoint (trainer state written last by the Trainer), or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for child in checkpoint_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def resume_checkpoint(checkpoint_dir: Path) -> Path:
    """The checkpoint a resume continues from, or a ConfigError saying there is none."""
    checkpoint = last_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise ConfigError(
            "the run in output_dir has no complete checkpoint to resume from",
            f"{checkpoint_dir}",
            "start a new run (or check that save_steps was reached before it stopped)",
        )
    return checkpoint
