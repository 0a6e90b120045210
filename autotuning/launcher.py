"""Multi-process training through ``accelerate launch``: DDP (CPU gloo or GPUs) and FSDP (GPUs).

We do not launch processes ourselves. The parent (CLI or UI) checks the input, prepares the run
directory, writes an accelerate config file there and runs ``accelerate launch --config_file ...
-m autotuning train --config <run>/config.yaml``. Every process runs the same recipe
(:func:`autotuning.recipe.run_job`); rank 0 alone writes ``metrics.jsonl``, ``run.json``, evaluates and
exports. The parent holds the run's lock for the whole launch and follows the run by tailing
``metrics.jsonl``. A second stop request, or a stop that is not honoured in time, terminates the
process group.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from .config import Config, Distributed, Precision, environment_token_lent
from .data import prepare_data
from .distributed import LAUNCHED_ENV, STOP_FILE, check_distributed, gpu_count, resolve_num_processes
from .errors import ConfigError
from .modeling import load_tokenizer, resolve_model_path, resolve_precision
from .recipe import export_preflight
from .runs import Operation, RunLock, RunStatus, clear_run_dir, resolve_run_dir, resume_checkpoint, truncate_metrics
from .runs.checkpoints import checkpoint_step

__all__ = [
    "LaunchPlan",
    "main_process_port",
    "transformer_layer_class",
    "build_accelerate_config",
    "prepare_launch",
    "launch",
]

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def transformer_layer_class(model_path: str, token: str | None = None, trust_remote_code: bool = False) -> str:
    """The decoder-layer class FSDP should wrap, read from the model class (no weights loaded).

    transformers names the blocks that must not be split across devices in ``_no_split_modules``; for
    decoder-only models that is the transformer layer (``LlamaDecoderLayer``, ``GPT2Block`` ...).
    """
    model_config = AutoConfig.from_pretrained(model_path, token=token, trust_remote_code=trust_remote_code)
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(model_config)]
    except KeyError:
        raise ConfigError(
            f"no causal-LM class is known for model type '{model_config.model_type}'",
            "field 'model_name'",
            "use distributed: ddp, or a model transformers supports natively",
        ) from None
    layers = [name for name in (model_class._no_split_modules or []) if "Layer" in name or "Block" in name]
    if not layers:
        raise ConfigError(
            f"{model_class.__name__} does not declare its transformer layer class, so FSDP cannot wrap it",
            "field 'distributed'",
            "use distributed: ddp for this model",
        )
    return ",".join(layers)


def _mixed_precision(config: Config) -> str:
    precision = resolve_precision(config.training.precision if config.training.precision else Precision.AUTO)
    return {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")


# torch's usual rendezvous port, for machines that must agree on one without talking first.
DEFAULT_MULTI_MACHINE_PORT = 29500


def main_process_port(config: Config) -> int:
    """The rendezvous port: the config's, else 29500 with several machines, else any free port on this one."""
    t = config.training
    return t.main_process_port or (DEFAULT_MULTI_MACHINE_PORT if t.num_machines > 1 else _free_port())


def build_accelerate_config(config: Config, model_path: str, num_processes: int) -> dict[str, Any]:
    """The accelerate config file's content for this run (written to ``<run>/accelerate_config.yaml``).

    ``num_processes`` is this machine's; accelerate's is the total over all machines."""
    gpus = gpu_count()
    t = config.training
    data: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        # On CPU, accelerate's MULTI_CPU type wants an MPI launcher; MULTI_GPU with the Trainer's use_cpu=True
        # runs torch's elastic launcher with gloo, which is what works on one CPU machine.
        "distributed_type": "MULTI_GPU",
        "downcast_bf16": "no",
        "machine_rank": t.machine_rank,
        "main_training_function": "main",
        "mixed_precision": _mixed_precision(config) if gpus else "no",  # on CPU the Trainer's autocast decides
        "num_machines": t.num_machines,
        "num_processes": num_processes * t.num_machines,
        "rdzv_backend": t.rdzv_backend.value,
        "same_network": True,
        "use_cpu": False,
    }
    if t.num_machines > 1:
        data["main_process_ip"] = t.main_process_ip.strip()
        data["main_process_port"] = main_process_port(config)
    if gpus:
        data["gpu_ids"] = "all"
    if config.training.distributed is Distributed.FSDP:
        data["distributed_type"] = "FSDP"
        data["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": transformer_layer_class(
                model_path, config.model.hf_token or None, config.model.trust_remote_code
            ),
            # Full shard: parameters, gradients and optimizer state split across ranks, re-gathered per layer.
            "fsdp_reshard_after_forward": True,
            # A full (unsharded) state dict on save: checkpoints and the adapter load without FSDP, so the
            # run merges and exports like a single-process one.
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": config.training.gradient_checkpointing,
        }
    return data


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LaunchPlan:
    run_dir: Path
    accelerate_config: Path
    command: list[str]
    num_processes: int
    env: dict[str, str] = field(default_factory=dict)
    lock: RunLock | None = None  # held by the parent from prepare_launch until launch returns
    scratch: Path | None = None  # a machine other than 0: where its launch files are, removed after the launch

    @property
    def writes_run(self) -> bool:
        """False on machines other than 0 of a multi-machine run: machine 0 writes the run."""
        return self.scratch is None

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)


def prepare_launch(config: Config, extra_args: list[str] | tuple[str, ...] = ()) -> LaunchPlan:
    """Check everything a worker would reject, then create the run directory with the launch files.

    Bad input raises a UserError here, in the parent, with nothing written (the same promise as a
    single-process run).
    """
    check_distributed(config)
    if config.training.machine_rank > 0:
        return _prepare_other_machine(config, extra_args)
    run = resolve_run_dir(config)
    # The parent holds the run's lock for the whole launch: no other job can resume, export or overwrite it.
    lock = RunLock(run.path, Operation.TRAIN).acquire_if_present()
    try:
        model_path = resolve_model_path(config.model.model_name)  # builds a builtin model once, not once per rank
        tokenizer = load_tokenizer(config)
        prepare_data(config, tokenizer)  # a bad dataset fails here with its row number, before any process starts
        hf_config = AutoConfig.from_pretrained(
            model_path, token=config.model.hf_token or None, trust_remote_code=config.model.trust_remote_code
        )
        export_preflight(config, hf_config)
        num_processes = resolve_num_processes(config)
        accelerate = build_accelerate_config(config, model_path, num_processes)
        plan = _write_launch_files(run, config, accelerate, num_processes, extra_args, lock)
    except BaseException:
        lock.release()
        raise
    plan.lock = lock
    return plan


def _prepare_other_machine(config: Config, extra_args) -> LaunchPlan:
    """Machine 1, 2, ... of a multi-machine run: its processes train, machine 0 writes the run. Nothing is written
    to this machine's output_dir: the launch files go to a temporary folder, removed when the launch ends."""
    model_path = resolve_model_path(config.model.model_name)
    prepare_data(config, load_tokenizer(config))  # the same input checks as machine 0, before joining it
    num_processes = resolve_num_processes(config)
    accelerate = build_accelerate_config(config, model_path, num_processes)
    folder = Path(tempfile.mkdtemp(prefix=f"autotuning-machine-{config.training.machine_rank}-"))
    config_path = folder / "config.yaml"
    config.save_yaml(config_path)
    accelerate_path = folder / "accelerate_config.yaml"
    accelerate_path.write_text(yaml.safe_dump(accelerate, sort_keys=False), encoding="utf-8")
    command = _launch_command(accelerate_path, accelerate["main_process_port"], config_path, extra_args)
    env = {LAUNCHED_ENV: str(Path(config.run.output_dir).expanduser().resolve())}
    return LaunchPlan(
        Path(config.run.output_dir).expanduser(), accelerate_path, command, num_processes, env, None, folder
    )


def _launch_command(accelerate_path: Path, port: int, config_path: Path, extra_args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_path),
        "--main_process_port",
        str(port),
        "-m",
        "autotuning",
        "train",
        "--config",
        str(config_path),
        *extra_args,
    ]


def _write_launch_files(
    run, config: Config, accelerate: dict[str, Any], num_processes: int, extra_args, lock: RunLock
) -> LaunchPlan:
    if config.training.resume:
        checkpoint = resume_checkpoint(run.checkpoints)
        # Cut the curve back to the checkpoint here, before anyone follows metrics.jsonl (rank 0 does the same).
        truncate_metrics(run.metrics_path, checkpoint_step(checkpoint))
    elif run.path.exists() and config.run.overwrite_output_dir:
        clear_run_dir(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    if not lock.held:
        lock.acquire()
    (run.path / STOP_FILE).unlink(missing_ok=True)  # a stale request from an earlier stop must not end this run
    config.save_yaml(run.config_path)
    accelerate_path = run.path / "accelerate_config.yaml"
    accelerate_path.write_text(yaml.safe_dump(accelerate, sort_keys=False), encoding="utf-8")
    port = accelerate.get("main_process_port") or _free_port()
    command = _launch_command(accelerate_path, port, run.config_path, extra_args)
    env = {LAUNCHED_ENV: str(run.path.resolve())}
    plan = LaunchPlan(run.path, accelerate_path, command, num_processes, env)
    previous = run.read()
    run.update(
        status=RunStatus.LAUNCHING.value,
        started_at=previous.get("started_at", time.time()),
        launch_command=plan.command_line,
        distributed=config.training.distributed.value,
        num_machines=config.training.num_machines,
        num_processes=num_processes,  # per machine
    )
    return plan


def launch(
    plan: LaunchPlan,
    config: Config,
    stop_event: threading.Event,
    abort_event: threading.Event | None = None,
    on_output: Callable[[str], None] | None = None,
    stop_grace_s: float = 600.0,
) -> int:
    """Run the plan's command and wait. Returns the launcher's exit status.

    ``stop_event`` asks for a graceful stop (checkpoint saved); ``abort_event`` terminates the process
    group at once. Without ``on_output`` the processes write to this process's stdout/stderr.
    """
    try:
        return _run_launched(plan, config, stop_event, abort_event, on_output, stop_grace_s)
    finally:
        if plan.lock is not None:
            plan.lock.release()
        if plan.scratch is not None:
            shutil.rmtree(plan.scratch, ignore_errors=True)


def _run_launched(plan, config, stop_event, abort_event, on_output, stop_grace_s) -> int:
    env = dict(os.environ)
    env.update(plan.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")]))
    if not environment_token_lent():
        # The app: a worker reads HF_TOKEN like the CLI it is, so the server's own token must not reach it; the
        # session's token (set below) is the only one it gets.
        env.pop("HF_TOKEN", None)
        env.pop("HUGGING_FACE_HUB_TOKEN", None)
    if config.model.hf_token:
        env["HF_TOKEN"] = config.model.hf_token  # the token travels in the environment, never on disk
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, plan.num_processes))))
    capture = on_output is not None
    proc = subprocess.Popen(
        plan.command,
        env=env,
        # Own process group: Ctrl-C in a terminal reaches the parent only, which turns it into a clean stop.
        start_new_session=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
        bufsize=1,
    )
    reader = None
    if capture:

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                on_output(line.rstrip("\n"))

        reader = threading.Thread(target=pump, name="autotuning-launch-output", daemon=True)
        reader.start()
    stop_sent_at: float | None = None
    while proc.poll() is None:
        if abort_event is not None and abort_event.is_set():
            _terminate_group(proc)
            break
        if stop_event.is_set() and stop_sent_at is None:
            if plan.writes_run:  # machine 0's ranks read it and tell every other rank (one all-reduce per step)
                (plan.run_dir / STOP_FILE).write_text("stop requested\n", encoding="utf-8")
            else:
                _terminate_group(proc)  # another machine cannot ask for a checkpoint; machine 0 saves the last one
                break
            stop_sent_at = time.monotonic()
        if stop_sent_at is not None and time.monotonic() - stop_sent_at > stop_grace_s:
            _terminate_group(proc)
            break
        time.sleep(0.2)
    rc = proc.wait()
    if reader is not None:
        reader.join(timeout=5)
    if plan.writes_run:
        (plan.run_dir / STOP_FILE).unlink(missing_ok=True)
    return rc


def _terminate_group(proc: subprocess.Popen, wait_s: float = 20.0) -> None:
    """SIGTERM the launcher's process group, then SIGKILL what is still there after ``wait_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=wait_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
