"""The runs layer: one lock per run (live owners respected, crashed ones taken over), listing without torch,
and the jobs that act on a run: a live training is never resumed or exported by another process, and two
exports of one run both end verified."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from autotuning.cli import main
from autotuning.config import load_config
from autotuning.errors import RunBusyError
from autotuning.pipeline import Pipeline
from autotuning.recipe import run_job
from autotuning.runs import (
    Operation,
    RunDir,
    RunLock,
    RunStatus,
    list_runs,
    lock_owner,
    read_metrics,
)

REPO = Path(__file__).resolve().parents[1]


def _finished_run(out: Path, **extra):
    sets = {
        "dataset_path": "sample",
        "output_dir": out,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "eval_split": 0,
        "max_seq_length": 128,
        "peft_type": "lora",
        "save_format": "torch",
    }
    sets.update(extra)
    result = run_job(load_config(None, [f"{k}={v}" for k, v in sets.items()]), show_progress=False)
    assert result.status == "finished"
    return result.run_dir


def test_a_live_owner_is_respected_and_a_crashed_one_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run, Operation.EXPORT).acquire():
        owner = lock_owner(run)
        assert owner["operation"] == "export" and owner["pid"] > 0
        with pytest.raises(RunBusyError, match="being exported by process"):
            RunLock(run, Operation.TRAIN).acquire()  # another job of this same process is excluded too
    assert lock_owner(run) is None

    # A process that dies holding the lock (SIGKILL: no cleanup at all) leaves its record but not the lock.
    holder = textwrap.dedent(f"""
        import sys, time
        from autotuning.runs import Operation, RunLock
        RunLock({str(run)!r}, Operation.TRAIN).acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert lock_owner(run)["pid"] == proc.pid
        with pytest.raises(RunBusyError, match=f"being trained by process {proc.pid}") as err:
            RunLock(run, Operation.EXPORT).acquire(wait=True)  # even a waiting export does not queue behind training
        assert "wait for that training to end" in err.value.message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # the stale record is still there
    assert lock_owner(run) is None
    with RunLock(run, Operation.TRAIN).acquire():  # taken over
        assert lock_owner(run)["pid"] != proc.pid


def test_listing_runs_reads_liveness_from_the_lock_and_never_imports_torch(tmp_path):
    root = tmp_path / "runs"
    for name in ("live", "crashed", "done"):
        (root / name).mkdir(parents=True)
    RunDir(root / "live").update(status="running", started_at=3)
    RunDir(root / "crashed").update(status="running", started_at=2)
    RunDir(root / "done").update(status="finished", started_at=1)
    with RunLock(root / "live", Operation.TRAIN).acquire():
        rows = {r["name"]: r for r in list_runs(root)}
        assert rows["live"]["status"] == "running" and rows["live"]["busy"] == "train"
        assert rows["crashed"]["status"] == "interrupted" and rows["done"]["status"] == "finished"
        probe = (
            "import sys; from autotuning.runs import list_runs; "
            f"rows = {{r['name']: r['status'] for r in list_runs({str(root)!r})}}; "
            "print(rows['live'], 'torch' in sys.modules)"
        )
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["running", "False"]  # another process sees the live run as running
    assert {r["name"]: r["status"] for r in list_runs(root)}["live"] == "interrupted"
    assert [RunStatus.parse(r["status"]) for r in list_runs(root)][0] is RunStatus.INTERRUPTED


def test_a_run_that_a_live_process_trains_cannot_be_resumed_or_exported(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "autotuning", "train", "--quiet", "--set", "dataset_path=sample"]
    for item in (f"output_dir={out}", "max_steps=100000", "logging_steps=1", "save_steps=5", "eval_split=0"):
        cmd += ["--set", item]
    cmd += ["--set", "max_seq_length=128", "--set", "per_device_train_batch_size=2", "--set", "peft_type=lora"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while (
            time.monotonic() < deadline and not (out / "checkpoints" / "checkpoint-5" / "trainer_state.json").exists()
        ):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert RunDir(out).read().get("status") == "running" and lock_owner(out)["pid"] == proc.pid
        config_before = (out / "config.yaml").read_bytes()

        assert main(["train", "--resume", "--set", f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"the run is being trained by process {proc.pid}" in err and str(out) in err
        assert main(["export", "--run", str(out), "--format", "torch"]) == 2
        assert f"the run is being trained by process {proc.pid}" in capsys.readouterr().err
        assert main(["train", "--set", f"output_dir={out}", "--set", "overwrite_output_dir=true"]) == 2
        assert "being trained" in capsys.readouterr().err

        # The live run carries on untouched: still running, still logging, same config, nothing of ours written.
        steps = len(read_metrics(out / "metrics.jsonl"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(read_metrics(out / "metrics.jsonl")) <= steps + 2:
            time.sleep(0.2)
        assert len(read_metrics(out / "metrics.jsonl")) > steps + 2
        assert (out / "config.yaml").read_bytes() == config_before and not (out / "merged").exists()
        assert RunDir(out).read()["status"] == "running" and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)  # a clean stop: checkpoint saved, exit 130
        rc = proc.wait(timeout=120)
    assert rc == 130 and RunDir(out).read()["status"] == "stopped"
    train_steps = [e["step"] for e in read_metrics(out / "metrics.jsonl") if e.get("type") == "train"]
    assert train_steps == list(range(1, len(train_steps) + 1))  # one curve, no gap, no second writer
    assert "being trained" not in (out / "train.log").read_text()  # the refusals went to their own consoles
    assert lock_owner(out) is None
    assert main(["train", "--resume", "--quiet", "--set", f"output_dir={out}", "--set", "max_steps=12"]) == 0


def test_two_exports_of_one_run_started_together_both_end_verified(tmp_path):
    run_dir = _finished_run(tmp_path / "run")
    pipeline = Pipeline(tmp_path)
    first, second = pipeline.export(run_dir, ["torch"]), pipeline.export(run_dir, ["torch"])
    assert first.wait(300) and second.wait(300)
    for task in (first, second):
        assert task.status is RunStatus.FINISHED, task.error
        assert task.result["torch"]["status"] == "verified" and task.progress()["fraction"] == 1.0
    assert RunDir(run_dir).read()["exports"]["torch"]["status"] == "verified"
    AutoModelForCausalLM.from_pretrained(run_dir / "merged")  # a valid model, whichever export installed last
    assert not list(run_dir.glob(".merged-*")) and not list(run_dir.glob(".adapter-*"))
    assert lock_owner(run_dir) is None


def test_tasks_beside_a_training_job_refuse_its_run_and_serve_others(tmp_path):
    """The policy: an export or evaluation runs beside training at once; of the run being trained, it is refused."""
    other = _finished_run(tmp_path / "other")
    pipeline = Pipeline(tmp_path)
    started = threading.Event()

    config = load_config(
        None,
        [
            "dataset_path=sample",
            f"output_dir={tmp_path / 'training'}",
            "max_steps=100000",
            "logging_steps=1",
            "eval_split=0",
            "max_seq_length=128",
            "peft_type=lora",
        ],
    )
    run = pipeline.start(config)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not run.events(0):
            time.sleep(0.1)
        started.set()
        logging.getLogger("autotuning").warning("a line from another job of this app")
        same = pipeline.export(run.run_dir, ["torch"])
        beside = pipeline.export(other, ["torch"])
        assert same.wait(60) and beside.wait(300)
        assert same.status is RunStatus.FAILED and "the run is being trained by process" in same.error
        assert beside.status is RunStatus.FINISHED and beside.result["torch"]["status"] == "verified", beside.error
        assert run.is_active()
    finally:
        run.stop()
        run.wait(120)
    assert started.is_set() and run.status is RunStatus.STOPPED
    log = (run.run_dir / "train.log").read_text()
    assert "run directory:" in log  # the job's own lines are there; another thread's, and the export's, are not
    assert "a line from another job" not in log and "export torch" not in log
