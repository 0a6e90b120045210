"""Everything about a run directory: paths, status, checkpoints, metric events, run.json, the run's lock.

A run directory holds::

    config.yaml        the config (token never written)
    run.json           status, timings, versions, dataset fingerprint and stats, parity figures
    metrics.jsonl      one metric event per line (the live chart's history)
    train.log          full log, tracebacks included
    .lock              held (flock) by the job working on the run; see lock.py
    checkpoints/       resumable Trainer checkpoints (checkpoint-<step>/)
    adapter/           the trained LoRA adapter
    merged/            the merged model + tokenizer (safetensors)
    eval_results.json|csv

A sweep's folder holds sweep.yaml, sweep.json and one such run directory per trial (see sweeps.py);
compare.py reads several runs side by side.

This layer sits just above config: it never imports torch, so listing runs stays instant.
"""

from .checkpoints import checkpoint_step, last_checkpoint, resume_checkpoint
from .directory import (
    RunDir,
    base_run_model,
    clear_run_dir,
    default_run_name,
    library_versions,
    list_runs,
    load_run_config,
    resolve_run_dir,
    write_json_atomic,
)
from .compare import Comparison, ComparisonTables, compare_runs, comparison_tables, describe_comparison, format_cell
from .events import MetricsSink, read_metrics, truncate_metrics
from .lock import LOCK_FILE, Operation, RunLock, is_locked, lock_owner
from .status import ACTIVE, ENDED, RunStatus
from .sweeps import (
    SweepDir,
    is_sweep,
    load_sweep_config,
    plan_trials,
    prepare_sweep,
    run_sweep,
    sweep_trial_dirs,
)

__all__ = [
    "Comparison",
    "ComparisonTables",
    "SweepDir",
    "compare_runs",
    "comparison_tables",
    "describe_comparison",
    "format_cell",
    "is_sweep",
    "load_sweep_config",
    "plan_trials",
    "prepare_sweep",
    "run_sweep",
    "sweep_trial_dirs",
    "ACTIVE",
    "ENDED",
    "LOCK_FILE",
    "MetricsSink",
    "Operation",
    "RunDir",
    "base_run_model",
    "RunLock",
    "RunStatus",
    "checkpoint_step",
    "clear_run_dir",
    "default_run_name",
    "is_locked",
    "last_checkpoint",
    "library_versions",
    "list_runs",
    "load_run_config",
    "lock_owner",
    "read_metrics",
    "resolve_run_dir",
    "resume_checkpoint",
    "truncate_metrics",
    "write_json_atomic",
]
