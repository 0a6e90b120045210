"""report_to: the trackers transformers integrates write under the run directory, with our figures and config."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from autotuning.config import ConfigError, load_config
from autotuning.recipe import run_job
from autotuning.runs import read_metrics
from autotuning.training.trackers import TRACKER_EXTRAS, check_trackers, tracker_environment

TOKEN = "hf_SENTINEL_tracker_0123456789"


def _config(tmp_path, *trackers: str, **extra):
    sets = {
        "fine_tuning_type": "instruction_fine_tuning",
        "dataset_path": "sample",
        "output_dir": str(tmp_path / "run"),
        "max_seq_length": 256,
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "save_steps": 10,
        "eval_split": 0.1,
        "eval_steps": 3,
        "eval_generations": 0,
        "report_to": ",".join(trackers),
        "hf_token": TOKEN,
    }
    sets.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def test_report_to_parses_from_yaml_and_the_command_line(tmp_path):
    assert load_config(None, []).run.report_to == []
    assert load_config(None, ["report_to=none"]).run.report_to == []
    cli = load_config(None, ["report_to=tensorboard,mlflow,tensorboard"])
    assert [str(r) for r in cli.run.report_to] == ["tensorboard", "mlflow"]
    path = tmp_path / "c.yaml"
    path.write_text("report_to: [tensorboard, wandb]\n", encoding="utf-8")
    assert [str(r) for r in load_config(path, []).run.report_to] == ["tensorboard", "wandb"]
    assert load_config(None, ["report_to=trackio"]).to_flat_dict()["report_to"] == ["trackio"]
    with pytest.raises(ConfigError, match="report_to") as err:
        load_config(None, ["report_to=tensorbord"])
    assert "tensorboard" in str(err.value)
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, ["report_to=none,mlflow"])


def test_a_missing_tracker_names_its_extra_before_training(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    config = _config(tmp_path, "tensorboard", "mlflow")
    with pytest.raises(ConfigError, match=r"pip install 'autotuning\[mlflow\]'"):
        check_trackers(config)
    with pytest.raises(ConfigError, match=r"autotuning\[mlflow\]"):
        run_job(config, show_progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_tracker_environment_is_scoped_and_keeps_what_the_user_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", "/elsewhere")
    config = _config(tmp_path, "mlflow", "wandb", "trackio")
    before = dict(os.environ)
    with tracker_environment(config, tmp_path / "run"):
        assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "run" / "mlruns").resolve().as_uri()
        assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == "/elsewhere"
        assert os.environ["TRACKIO_DIR"] == str((tmp_path / "run" / "trackio").resolve())
    assert dict(os.environ) == before  # nothing leaks into the next run of the same process


def test_extras_are_declared_in_pyproject():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for module, extra in TRACKER_EXTRAS.values():
        assert any(req.split("==")[0].startswith(module) for req in extras[extra]), extra


def test_tensorboard_and_mlflow_get_every_train_point_our_figures_and_the_config(tmp_path, monkeypatch):
    """Acceptance: event files and an MLflow store under the run directory, one point per train event."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TENSORBOARD_LOGGING_DIR", "MLFLOW_EXPERIMENT_NAME")
    for var in (*names, "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    result = run_job(_config(tmp_path, "tensorboard", "mlflow"), show_progress=False)
    assert result.status == "finished"
    run = result.run_dir
    train = [e for e in read_metrics(run / "metrics.jsonl") if e.get("type") == "train"]
    assert len(train) >= 3
    assert "MLFLOW_TRACKING_URI" not in os.environ

    # TensorBoard
    (events,) = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [p.step for p in loss] == [e["step"] for e in train]
    assert [round(p.value, 4) for p in loss] == [round(e["loss"], 4) for e in train]
    assert [p.step for p in acc.Scalars("train/tokens_per_second")] == [e["step"] for e in train]
    assert "eval/loss" in acc.Tags()["scalars"]
    texts = acc.Tags()["tensors"]
    assert any("autotuning_config" in t for t in texts), texts
    (config_text,) = [t for t in texts if "autotuning_config" in t]
    written = acc.Tensors(config_text)[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 6" in written and TOKEN not in written

    # MLflow: a file store under the run, read back with its own client
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 reads file stores on this opt-in only
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (experiment,) = client.search_experiments()
    (mlrun,) = client.search_runs([experiment.experiment_id])
    params = mlrun.data.params
    assert params["autotuning/max_steps"] == "6" and params["autotuning/report_to"] == "tensorboard,mlflow"
    assert not any(TOKEN in v for v in params.values())
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert [m.step for m in history] == [e["step"] for e in train]
    assert len(client.get_metric_history(mlrun.info.run_id, "tokens_per_second")) == len(train)
    for path in run.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


def _train_events(run) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e.get("type") == "train"]


def test_trackio_writes_its_local_store_under_the_run(tmp_path, monkeypatch):
    import sqlite3

    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed")
    import trackio  # noqa: F401  imported first, as TRL's model card does at any checkpoint: the store moves anyway

    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)
    result = run_job(_config(tmp_path, "trackio"), show_progress=False)
    assert result.status == "finished"
    train = _train_events(result.run_dir)
    (db,) = (result.run_dir / "trackio").glob("*.db")
    with sqlite3.connect(db) as conn:
        points = [json.loads(m) for (m,) in conn.execute("select metrics from metrics order by step")]
        (config,) = [json.loads(c) for (c,) in conn.execute("select config from configs")]
    losses = [p for p in points if "train/loss" in p]
    assert len(losses) == len(train) and all("train/tokens_per_second" in p for p in losses)
    assert config["autotuning"]["max_steps"] == 6 and "hf_token" not in config["autotuning"]
    assert "TRACKIO_DIR" not in os.environ


def test_wandb_writes_an_offline_run_under_the_run(tmp_path, monkeypatch):
    """wandb 0.31 ships no reader for its offline .wandb file: the check is that our keys are in it, the token not."""
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    result = run_job(_config(tmp_path, "wandb"), show_progress=False)
    assert result.status == "finished"
    (record,) = (result.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    for key in (b"train/loss", b"train/tokens_per_second", b"train/eta_s", b"autotuning"):
        assert key in data, key
    assert TOKEN.encode() not in data
    assert "WANDB_MODE" not in os.environ and "WANDB_DIR" not in os.environ
