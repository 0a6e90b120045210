"""Stops, crashes and restarts keep everything; concurrent readers are safe."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from autotuning.config import load_config
from autotuning.recipe import run_job
from autotuning.runs import MetricsSink, RunDir, list_runs, read_metrics

REPO = Path(__file__).resolve().parents[1]


def _config(out: Path, **extra):
    sets = {
        "dataset_path": "sample",
        "output_dir": out,
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_steps": 100,
        "eval_split": 0,
        "seed": 7,
        "max_seq_length": 256,
    }
    sets.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def test_stop_and_resume_reach_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Same step counter, optimizer state, LR schedule, data order and RNG: the resumed run ends bit-for-bit equal."""
    straight = run_job(_config(tmp_path / "straight"), show_progress=False)

    stop = threading.Event()

    class StopAfterStep5(MetricsSink):
        def emit(self, event):
            super().emit(event)
            if event.get("type") == "train" and event["step"] >= 5:
                stop.set()

    config = _config(tmp_path / "stopped")
    first = run_job(config, stop_event=stop, sink=StopAfterStep5(), show_progress=False)
    assert first.status == "stopped" and 5 <= first.global_step < 12
    resumed = run_job(config.replace(resume=True), show_progress=False)
    assert resumed.status == "finished" and resumed.global_step == 12

    a = load_file(str(straight.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)

    def losses(run):
        return [e["loss"] for e in read_metrics(run.run_dir / "metrics.jsonl") if e["type"] == "train"]

    assert losses(resumed) == losses(straight)


def test_sigkill_mid_run_is_listed_as_interrupted_and_resumes(tmp_path):
    out = tmp_path / "runs" / "killed"
    cmd = [
        sys.executable,
        "-m",
        "autotuning",
        "train",
        "--set",
        f"output_dir={out}",
        "--set",
        "max_steps=400",
        "--set",
        "save_steps=4",
        "--set",
        "logging_steps=1",
        "--set",
        "eval_split=0",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline and not (out / "checkpoints" / "checkpoint-8" / "trainer_state.json").is_file()
        ):
            time.sleep(0.1)
        assert (out / "checkpoints" / "checkpoint-8" / "trainer_state.json").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [r["status"] for r in list_runs(tmp_path / "runs")] == ["interrupted"]
    # What a kill can leave behind: a checkpoint without its final trainer_state.json, a torn metrics line.
    torn = out / "checkpoints" / "checkpoint-999"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"partial")
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"type": "train", "step": 10')

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "autotuning",
            "train",
            "--resume",
            "--set",
            f"output_dir={out}",
            "--set",
            "max_steps=16",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = RunDir(out).read()
    assert record["status"] == "finished" and record["global_step"] == 16
    resumed_from = Path(record["resumed_from"]).name
    assert resumed_from != "checkpoint-999" and int(resumed_from.split("-")[1]) >= 8  # the torn one was never picked
    steps = [e["step"] for e in read_metrics(out / "metrics.jsonl") if e["type"] == "train"]
    assert steps == list(range(1, 17))  # one curve: the torn line dropped, the steps after the checkpoint redone once


def test_concurrent_readers_never_see_a_torn_run_record(tmp_path):
    out = tmp_path / "runs" / "busy"
    errors: list[str] = []
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                if out.is_dir() and (out / "run.json").is_file():
                    record = json.loads((out / "run.json").read_text())
                    assert "status" in record
                list_runs(tmp_path / "runs")
                read_metrics(out / "metrics.jsonl")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        result = run_job(_config(out, max_steps=8, save_steps=2), show_progress=False)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert result.status == "finished"
    assert errors == []


def test_the_app_trains_on_the_thread_that_serves_its_executor(tmp_path, monkeypatch):
    """`python app.py` gives its main thread to training (faster on a CPU): the job waits for it, runs on it."""
    import autotuning.pipeline as job
    from autotuning.config import load_config, quickstart_overrides
    from autotuning.pipeline import MainThreadExecutor, Pipeline, RunStatus

    threads = []
    real_run_job = job.run_job
    monkeypatch.setattr(
        job, "run_job", lambda *a, **k: threads.append(threading.current_thread()) or real_run_job(*a, **k)
    )
    executor = MainThreadExecutor()
    pipeline = Pipeline(tmp_path, executor=executor)
    sets = [f"output_dir={tmp_path / 'run'}", "max_steps=3", "eval_generations=0"]  # answers: not what this checks
    config = load_config(None, sets, defaults=quickstart_overrides())
    run = pipeline.start(config)
    assert run.status is RunStatus.QUEUED and not run.wait(0.2)  # nothing runs until the thread serves
    executor.serve(keep_going=lambda: not run.wait(0))
    assert threads == [threading.current_thread()]
    assert run.status is RunStatus.FINISHED, run.error
    assert run.result.global_step == 3 and any(e.get("type") == "train" for e in run.events(0))
    assert run.log_tail()  # the job's log lines still reach the Train tab
