"""Multi-process training through accelerate: DDP on CPU (gloo) for real, FSDP config checks, FSDP on GPUs."""

from __future__ import annotations

import collections
import json
import sys
import threading
import time

import pytest
import torch
import yaml

import autotuning.config as config_module
from autotuning.cli import main
from autotuning.config import Config, ConfigError, ModelConfig, load_config, quickstart_overrides
from autotuning.distributed import check_distributed
from autotuning.launcher import LaunchPlan, build_accelerate_config, launch, transformer_layer_class
from autotuning.modeling import resolve_model_path
from autotuning.pipeline import Pipeline, RunStatus
from autotuning.recipe import run_job
from autotuning.runs import read_metrics

# These start several CPU processes over gloo; on a machine with GPUs the processes take GPUs instead (and are
# refused with fewer GPUs than processes), so they run where CI runs them: on CPUs.
cpu_processes = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs CPU processes over gloo; this machine has GPUs"
)


def _quick(tmp_path, *sets: str):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", *sets], defaults=quickstart_overrides())


@cpu_processes
def test_cli_ddp_two_processes_on_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--set",
            "distributed=ddp",
            "--set",
            "num_processes=2",
            "--set",
            f"output_dir={out}",
            "--set",
            "max_steps=12",
            "--set",
            "logging_steps=2",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "launch: " in err and "accelerate.commands.launch --config_file" in err and "-m autotuning train" in err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["num_processes"] == 2
    assert record["device"] == "cpu x 2 processes"
    # Rank 0 alone writes the curve: every (kind, step) point appears once, not once per process.
    events = read_metrics(out / "metrics.jsonl")
    counts = collections.Counter((e["type"], e["step"]) for e in events if e["type"] in ("train", "eval"))
    assert counts and max(counts.values()) == 1
    assert [e["step"] for e in events if e["type"] == "train"][-1] == 12
    accelerate = yaml.safe_load((out / "accelerate_config.yaml").read_text())
    assert accelerate["num_processes"] == 2 and accelerate["distributed_type"] == "MULTI_GPU"
    assert (out / "merged" / "config.json").is_file() and not (out / ".trained").exists()
    assert record["exports"]["torch"]["max_abs_logit_diff"] <= 1e-4


@cpu_processes
def test_pipeline_streams_stops_and_resumes_a_ddp_run(tmp_path):
    # No generated answers after the resume: the curve is what is checked (test_cli_ddp_two_processes_on_cpu
    # covers a DDP run's end to end, answers included).
    config = _quick(
        tmp_path,
        "distributed=ddp",
        "num_processes=2",
        "max_steps=400",
        "save_steps=1000",
        "logging_steps=1",
        "eval_generations=0",
    )
    pipeline = Pipeline(tmp_path)
    run = pipeline.start(config)
    deadline = time.time() + 180
    while not any(e.get("type") == "train" for e in run.events(0)) and time.time() < deadline and run.is_active():
        time.sleep(0.2)
    assert any(e.get("type") == "train" for e in run.events(0)), run.log_tail()
    assert any(line.startswith("launch: ") for line in run.log_tail(400).splitlines())
    run.stop()
    assert run.wait(180)
    assert run.status is RunStatus.STOPPED, run.error
    stopped_at = run.result.global_step
    assert 0 < stopped_at < 400
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()
    assert not (tmp_path / "run" / "STOP").exists()

    resumed = pipeline.start(config.replace(resume=True, max_steps=stopped_at + 4))
    assert resumed.wait(240)
    assert resumed.status is RunStatus.FINISHED, resumed.error
    steps = [e["step"] for e in resumed.events(0) if e.get("type") == "train"]
    assert steps == list(range(1, stopped_at + 5))  # one curve, continued


def test_fsdp_is_refused_on_cpu_with_the_alternative():
    config = load_config(None, ["fsdp=true", "num_processes=2"])
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    with pytest.raises(ConfigError, match="ddp"):
        check_distributed(config)
    with pytest.raises(ConfigError, match="set num_processes"):
        check_distributed(load_config(None, ["distributed=ddp"]))
    with pytest.raises(ConfigError, match="run_job does not start"):
        run_job(load_config(None, ["distributed=ddp", "num_processes=2"]))


def test_fsdp_accelerate_config_names_the_models_layer_class():
    config = load_config(None, ["distributed=fsdp", "num_processes=2"])
    llama = build_accelerate_config(config, resolve_model_path("builtin:tiny-llama"), 2)
    assert llama["distributed_type"] == "FSDP"
    fsdp = llama["fsdp_config"]
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # checkpoints load unsharded for merge/export
    assert transformer_layer_class(resolve_model_path("builtin:tiny-gpt2")) == "GPT2Block"
    assert transformer_layer_class(resolve_model_path("builtin:tiny-qwen2")) == "Qwen2DecoderLayer"


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_gradient_checkpointing_is_fsdps_own_under_fsdp_and_the_trainers_otherwise(mode, tmp_path):
    """transformers raises on FSDP activation checkpointing and Trainer gradient checkpointing together: use one."""
    from autotuning.training import build_sft_config

    config = load_config(None, [f"distributed={mode}", "num_processes=2", "gradient_checkpointing=true"])
    args = build_sft_config(config, tmp_path, "fp32", has_eval=False, show_progress=False)
    if mode == "fsdp":
        accelerate = build_accelerate_config(config, resolve_model_path("builtin:tiny-llama"), 2)
        assert accelerate["fsdp_config"]["fsdp_activation_checkpointing"] is True
        assert args.gradient_checkpointing is False
    else:
        assert args.gradient_checkpointing is True


def test_seed_fsdp_flag_is_distributed_fsdp():
    assert load_config(None, ["fsdp=true"]).training.distributed.value == "fsdp"
    with pytest.raises(ConfigError, match="fsdp"):
        load_config(None, ["fsdp=true", "distributed=ddp"])
    with pytest.raises(ConfigError, match="ddp"):
        load_config(None, ["distributed=fsdp", "quantization=4bit", "peft_type=qlora"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA GPUs")
def test_fsdp_two_gpus_trains_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--set",
            "distributed=fsdp",
            "--set",
            "num_processes=2",
            "--set",
            f"output_dir={out}",
            "--set",
            "max_steps=10",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["exports"]["torch"]["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize(
    "lent,typed,seen",
    [
        (False, "", "- -"),  # the app: a session without a token gets none, not the server's
        (False, "hf_visitor", "hf_visitor -"),  # the app: the session's own token
        (True, "", "hf_server_owner hf_server_owner"),  # the CLI (or --lend-hf-token): the owner's, as before
    ],
)
def test_workers_get_the_sessions_token_never_the_servers(monkeypatch, tmp_path, lent, typed, seen):
    monkeypatch.setitem(config_module._ENVIRONMENT_TOKEN, "lent", lent)
    monkeypatch.setenv("HF_TOKEN", "hf_server_owner")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_server_owner")
    show = "import os; print(os.environ.get('HF_TOKEN', '-'), os.environ.get('HUGGING_FACE_HUB_TOKEN', '-'))"
    plan = LaunchPlan(tmp_path, tmp_path / "accelerate_config.yaml", [sys.executable, "-c", show], 1)
    lines: list[str] = []
    assert launch(plan, Config(model=ModelConfig(hf_token=typed)), threading.Event(), on_output=lines.append) == 0
    assert lines == [seen]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine(rank: int, sets: list[str], log, *flags: str):
    """One "machine" of a localhost multi-machine run: the CLI, as each machine of a cluster runs it. Its output
    goes to the file ``log`` (a pipe nobody reads while the test waits on the other machine would fill up and
    block this machine's processes, and with them the whole run)."""
    import os
    import subprocess
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    args = [a for s in [*sets, f"machine_rank={rank}"] for a in ("--set", s)]
    with open(log, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autotuning", "train", "--quiet", *flags, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    proc.log = log
    return proc


def _machines_sets(**extra) -> list[str]:
    values = {
        "distributed": "ddp",
        "num_processes": 1,
        "num_machines": 2,
        "main_process_ip": "127.0.0.1",
        "main_process_port": _free_port(),
        "logging_steps": 1,
        "save_steps": 5000,
        "ddp_timeout": 60,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _wait_for_train_event(metrics, procs, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.is_file() and '"type": "train"' in metrics.read_text():
            return
        time.sleep(0.5)
    raise AssertionError([p.poll() for p in procs])


def _finish(procs, timeout: float = 240) -> list[str]:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            p.kill()
    return [p.log.read_text(encoding="utf-8") for p in procs]


@cpu_processes
def test_two_machines_on_localhost_stop_and_resume_one_run_that_machine_0_writes(tmp_path):
    # Two "machines" (machine_rank 0 and 1, one gloo process each) on a shared output_dir, each started with the
    # command a cluster runs: stopped from machine 0, then resumed on both.
    import signal

    out = tmp_path / "run"
    # No generated answers at the end (machine 0's rank evaluates as in test_cli_ddp_two_processes_on_cpu): what is
    # checked here is the stop, the resume on both machines and the one curve.
    sets = _machines_sets(max_steps=2000, output_dir=out, eval_generations=0)
    procs = [_machine(rank, sets, tmp_path / f"machine{rank}.log") for rank in (0, 1)]
    _wait_for_train_event(out / "metrics.jsonl", procs)
    procs[0].send_signal(signal.SIGINT)  # Ctrl-C on machine 0: a stop with a checkpoint, for every machine
    logs = _finish(procs)
    assert procs[0].returncode == 130, logs[0][-3000:]  # EXIT_STOPPED
    assert procs[1].returncode == 0, logs[1][-3000:]
    assert "machine 1 of 2: training with machine 0 at 127.0.0.1" in logs[1]
    record = json.loads((out / "run.json").read_text())
    stopped_at = record["global_step"]
    assert record["status"] == "stopped" and 0 < stopped_at < 2000
    assert (out / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()

    sets = _machines_sets(max_steps=stopped_at + 4, output_dir=out, eval_generations=0)
    procs = [_machine(rank, sets, tmp_path / f"machine{rank}.log", "--resume") for rank in (0, 1)]
    logs = _finish(procs)
    assert procs[0].returncode == 0, logs[0][-3000:]
    assert procs[1].returncode == 0, logs[1][-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["global_step"] == stopped_at + 4
    assert record["num_machines"] == 2 and record["num_processes"] == 1
    assert record["device"] == "cpu, 2 machines x 1 process"
    accelerate = yaml.safe_load((out / "accelerate_config.yaml").read_text())
    assert (accelerate["num_machines"], accelerate["num_processes"], accelerate["machine_rank"]) == (2, 2, 0)
    events = read_metrics(out / "metrics.jsonl")
    counts = collections.Counter((e["type"], e["step"]) for e in events if e["type"] in ("train", "eval"))
    assert counts and max(counts.values()) == 1  # each point once: machine 0's rank alone writes
    assert [e["step"] for e in events if e["type"] == "train"] == list(range(1, stopped_at + 5))  # one curve
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "merged") is not None
    assert record["exports"]["torch"]["status"] == "verified"


@cpu_processes
def test_a_machine_that_loses_its_peer_fails_with_a_clear_message_not_a_hang(tmp_path):
    # Each machine has its own output_dir here, as machines without a shared filesystem would.
    import psutil

    outs = [tmp_path / "machine0", tmp_path / "machine1"]
    port = _free_port()
    procs = [
        _machine(rank, _machines_sets(max_steps=2000, output_dir=out, main_process_port=port), tmp_path / f"{rank}.log")
        for rank, out in enumerate(outs)
    ]
    try:
        _wait_for_train_event(outs[0] / "metrics.jsonl", procs)
        # Machine 1 goes away at once (a power cut): its launcher and its training process.
        for proc in [*psutil.Process(procs[1].pid).children(recursive=True), psutil.Process(procs[1].pid)]:
            proc.kill()
        lost_at = time.time()
        procs[0].wait(timeout=120)
        waited = time.time() - lost_at
        log0 = procs[0].log.read_text(encoding="utf-8")
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode not in (0, None)
    assert waited < 90, waited  # a dropped connection fails at once; a hung peer after ddp_timeout (60 s here)
    record = json.loads((outs[0] / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["error"].startswith("lost contact with another process of this run")
    assert "--resume" in record["error"] and "lost contact" in log0
    # Machine 1 wrote no run: at most its process's RNG state in a checkpoint folder (the Trainer's, for a resume).
    written = sorted(p.relative_to(outs[1]).as_posix() for p in outs[1].rglob("*") if p.is_file())
    assert all(p.startswith("checkpoints/checkpoint-") and p.endswith("/rng_state_1.pth") for p in written), written


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        (["num_machines=2"], "distributed"),  # several machines need a multi-process mode
        (["distributed=ddp", "num_processes=1", "num_machines=2"], "main_process_ip"),
        (["distributed=ddp", "num_machines=2", "machine_rank=2", "main_process_ip=10.0.0.1"], "machine_rank"),
        (["num_machines=0"], "num_machines"),
        (["ddp_timeout=0"], "ddp_timeout"),
    ],
)
def test_multi_machine_settings_are_checked_naming_the_field(sets, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert field in err.value.where


def test_accelerate_config_for_one_of_several_machines(tmp_path):
    config = load_config(
        None,
        ["distributed=ddp", "num_processes=2", "num_machines=3", "machine_rank=1", "main_process_ip=10.0.0.1"],
    )
    data = build_accelerate_config(config, str(resolve_model_path("builtin:tiny-llama")), 2)
    assert (data["num_machines"], data["machine_rank"], data["num_processes"]) == (3, 1, 6)  # 6 in total
    assert (data["main_process_ip"], data["main_process_port"], data["rdzv_backend"]) == ("10.0.0.1", 29500, "static")
    single = build_accelerate_config(_quick(tmp_path, "distributed=ddp", "num_processes=2"), "unused", 2)
    assert single["num_machines"] == 1 and "main_process_ip" not in single


def test_the_app_refuses_to_follow_a_machine_other_than_0(tmp_path):
    config = _quick(
        tmp_path, "distributed=ddp", "num_processes=1", "num_machines=2", "machine_rank=1", "main_process_ip=10.0.0.1"
    )
    with pytest.raises(ConfigError) as err:
        Pipeline(tmp_path).start(config)
    assert "machine_rank" in err.value.where and not (tmp_path / "run").exists()


def test_rank_0_evaluates_a_model_too_big_for_its_gpu_on_the_cpu(monkeypatch):
    # After an FSDP run the whole fp32 model is reloaded on rank 0; FSDP is there for models that do not fit one
    # GPU, so that copy goes to the GPU only when it fits (GPU memory mocked at its boundary, mem_get_info).
    from autotuning.recipe import evaluation_device

    model = torch.nn.Linear(1000, 1000)  # 4 MB of fp32 weights
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (3_000_000, 80_000_000_000))
    assert evaluation_device(model) == "cpu"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (80_000_000_000, 80_000_000_000))
    assert evaluation_device(model) == "cuda:0"
