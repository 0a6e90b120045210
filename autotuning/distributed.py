"""The multi-process runtime seen from inside one process: which rank am I, was I launched, do we all stop.

The launcher (the parent that starts the processes) is :mod:`autotuning.launcher`; this module is what the
recipe and the training callbacks need while they run, and it imports nothing above config.

Stopping: the parent writes a ``STOP`` file into the run directory; every rank checks it at the end of
each step and the ranks agree with one all-reduce (:func:`stop_requested_everywhere`), so they all stop
at the same step and save one checkpoint together (a signal would reach the ranks at different steps and
hang the collective).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import Config, Distributed
from .errors import ConfigError

__all__ = [
    "LAUNCHED_ENV",
    "STOP_FILE",
    "is_launched_worker",
    "is_main_process",
    "process_rank",
    "gpu_count",
    "resolve_num_processes",
    "check_distributed",
    "stop_requested_everywhere",
    "leave_process_group",
    "Role",
]

LAUNCHED_ENV = "AUTOTUNING_LAUNCHED"  # set by the parent to the run directory it prepared
STOP_FILE = "STOP"


def is_launched_worker() -> bool:
    """True inside a process started by :func:`launch` (the recipe must not launch again)."""
    return bool(os.environ.get(LAUNCHED_ENV)) and "WORLD_SIZE" in os.environ


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Global rank 0: the one process that writes the run, evaluates and exports."""
    return process_rank() == 0


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_num_processes(config: Config) -> int:
    """``num_processes``, or one per visible GPU when it is 0."""
    return config.training.num_processes or gpu_count()


def check_distributed(config: Config) -> None:
    """Refuse a multi-process setup this machine cannot run, before anything is written."""
    mode = config.training.distributed
    if mode is Distributed.NONE:
        return
    gpus = gpu_count()
    if mode is Distributed.FSDP and gpus == 0:
        raise ConfigError(
            "FSDP needs CUDA GPUs; on CPU accelerate's FSDP either errors or silently runs as plain DDP",
            "field 'distributed'",
            "use distributed: ddp (gloo) on CPU, or run on a machine with several GPUs",
        )
    wanted = resolve_num_processes(config)
    if wanted == 0:
        raise ConfigError(
            f"distributed: {mode} with num_processes 0 means one process per GPU, and this machine has none",
            "field 'num_processes'",
            "set num_processes (e.g. 2) to train with several CPU processes",
        )
    if wanted * config.training.num_machines < 2:
        raise ConfigError(
            f"distributed: {mode} with {wanted} process gains nothing over one process",
            "field 'num_processes'",
            "use distributed: none, or num_processes >= 2",
        )
    if gpus and wanted > gpus:
        raise ConfigError(
            f"num_processes is {wanted} but only {gpus} GPU(s) are visible",
            "field 'num_processes'",
            f"use num_processes: {gpus} (or 0 for all of them)",
        )


def stop_requested_everywhere(local: bool, device) -> bool:
    """True on every rank if any rank wants to stop (one all-reduce), so all ranks stop at the same step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def leave_process_group() -> None:
    """End this process's membership of the process group before the interpreter exits. A process that exits
    with gloo's threads still running aborts ("terminate called without an active exception"), which torchrun
    reports as a failed machine; the other machines then wait out their exit barrier."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Role:
    """What this process may do in a run, decided once from the launch environment (rank handling lives here).

    A single-process run is its own main process. In a launched multi-process run every rank trains, rank 0
    alone writes the run, evaluates and exports, and the launching parent, not the ranks, holds the run's lock.
    """

    def __init__(self) -> None:
        self.launched = is_launched_worker()
        self.rank = process_rank()

    @property
    def writes(self) -> bool:
        """Writes run.json, metrics.jsonl, train.log, evaluates and exports (global rank 0)."""
        return self.rank == 0

    @property
    def holds_lock(self) -> bool:
        """Takes the run's lock (a launched rank works under its parent's)."""
        return not self.launched

    @property
    def may_retry_out_of_memory(self) -> bool:
        """One rank cannot change the batch size alone: a multi-process run fails with the advice instead."""
        return not self.launched

    @property
    def prepares_directory(self) -> bool:
        """Clears a run directory being replaced (a launched run's parent already did, before the launch files)."""
        return not self.launched
