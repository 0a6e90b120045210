"""Sweeps and run comparison: a sweep's config is checked up front, its trials are normal runs in its folder, the
best one is marked, stop ends the trial and the sweep, resume continues both; compare names what differs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from autotuning.cli import main
from autotuning.config import ConfigError, load_config
from autotuning.pipeline import BusyError, Pipeline
from autotuning.recipe import run_job
from autotuning.runs import (
    RunDir,
    RunStatus,
    SweepDir,
    compare_runs,
    list_runs,
    load_sweep_config,
    read_metrics,
    sweep_trial_dirs,
)

# Small and fast: the tiny builtin model on the quickstart sample, no generated answers, torch export only.
_FAST = ["save_steps=100", "eval_generations=0", "save_format=torch"]


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in [*_FAST, *pairs] for arg in ("--set", pair)]


def test_a_sweep_is_checked_before_any_trial_trains():
    config = load_config(None, ["sweep={learning_rate: ['1e-3', 2e-3], lora_r: [4, 8]}"])
    assert config.search.sweep == {"learning_rate": [0.001, 0.002], "lora_r": [4, 8]}  # typed, YAML's 1e-3 too
    assert [p["lora_r"] for p in config.search.points(seed=0)] == [4, 8, 4, 8]
    random_pick = config.replace(sweep_method="random", sweep_trials=3).search.points(seed=7)
    assert len(random_pick) == 3 and len({json.dumps(p) for p in random_pick}) == 3  # no combination twice
    for sweep, needle in [
        ("{lora_rank: [4, 8]}", "lora_r"),  # a misspelt option suggests the right one
        ("{lora_r: [4, many]}", "lora_r"),  # a bad value names its option
        ("{output_dir: [a, b]}", "cannot vary output_dir"),
        ("{learning_rate: []}", "non-empty list"),
        ("[1, 2]", "mapping"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"sweep={sweep}"])
        assert needle in str(err.value), sweep
    with pytest.raises(ConfigError, match="budget"):
        load_config(None, ["sweep={lora_r: [4, 8]}", "sweep_method=random"])
    with pytest.raises(ConfigError, match="did you mean 'eval_loss'"):
        load_config(None, ["sweep_metric=eval_los"])


def test_a_two_by_two_sweep_runs_four_trials_and_marks_the_best(tmp_path, capsys):
    root = tmp_path / "runs" / "grid"
    code = main(
        [
            "train",
            "--no-progress",
            *_sets(
                "max_steps=6",
                f"output_dir={root}",
                "sweep={learning_rate: [1e-3, 2e-2], lora_r: [4, 8]}",
            ),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    record = SweepDir(root).read()
    names = [t["name"] for t in record["trials"]]
    assert names == ["trial-01", "trial-02", "trial-03", "trial-04"]
    assert all(t["status"] == "finished" for t in record["trials"])
    # Each trial is a normal run with its own options; the best is the lowest eval loss among them.
    losses = {t["name"]: RunDir(root / t["name"]).read()["eval_results"]["eval_loss"] for t in record["trials"]}
    best = min(losses, key=losses.get)
    assert record["best"]["name"] == best == summary["best"]["name"]
    assert load_config(root / "trial-04" / "config.yaml").training.learning_rate == pytest.approx(2e-2)
    assert load_config(root / "trial-04" / "config.yaml").peft.lora_r == 8
    # The sweep ends on its comparison: the four runs, the options that differ, the best marked.
    assert all(f"trial-0{i}" in captured.err for i in range(1, 5))
    assert f"* {best}" in captured.err and "best by eval_loss" in captured.err

    # compare on the sweep folder: the four trials, and exactly the two swept options differ.
    assert main(["compare", str(root)]) == 0
    out = capsys.readouterr().out
    compared = json.loads(out.strip().splitlines()[-1])
    assert [r["name"] for r in compared["runs"]] == names
    assert set(compared["differs"]) == {"learning_rate", "lora_r"}
    assert compared["best"] == best and f"* {best}" in out
    # The runs list shows the trials, under their sweep.
    rows = {r["name"]: r for r in list_runs(tmp_path / "runs")}
    assert {f"grid/{n}" for n in names} <= set(rows) and rows["grid/trial-01"]["sweep"] == "grid"


def test_compare_names_exactly_the_option_that_differs(tmp_path, capsys):
    runs = []
    for i, rate in enumerate(["1e-3", "5e-3"]):
        out = tmp_path / f"lr-{i}"
        config = load_config(None, [*_FAST, "max_steps=4", f"learning_rate={rate}", f"output_dir={out}"])
        assert run_job(config, show_progress=False).status == "finished"
        runs.append(out)
    assert main(["compare", *map(str, runs), "--metric", "eval_loss"]) == 0
    out = capsys.readouterr().out
    compared = json.loads(out.strip().splitlines()[-1])
    assert list(compared["differs"]) == ["learning_rate"]
    assert compared["differs"]["learning_rate"] == {"lr-0": 0.001, "lr-1": 0.005}
    losses = [RunDir(r).read()["eval_results"]["eval_loss"] for r in runs]
    assert [compared["metrics"][n]["eval_loss"] for n in ("lr-0", "lr-1")] == losses
    table = out.split("metrics (")[1]
    assert all(f"{loss:.4g}" in table for loss in losses)  # both eval losses are in the printed table
    assert "gen_" not in out  # no generated answers were asked for: no empty columns for them
    comparison = compare_runs(runs, "eval_loss")
    assert comparison.best == ("lr-0" if losses[0] <= losses[1] else "lr-1")
    assert all(len(comparison.curves[n]["train"]) >= 1 for n in ("lr-0", "lr-1"))
    with pytest.raises(ConfigError, match="two different runs"):
        compare_runs([runs[0], runs[0]])
    with pytest.raises(ConfigError, match="not a run directory"):
        compare_runs([runs[0], tmp_path])


def test_stop_ends_the_trial_and_the_sweep_and_resume_continues_both(tmp_path):
    pipeline = Pipeline(tmp_path / "runs")
    root = tmp_path / "runs" / "stoppable"
    config = load_config(
        None,
        [*_FAST, "max_steps=14", "logging_steps=1", f"output_dir={root}", "sweep={learning_rate: [1e-3, 5e-3]}"],
    )
    sweep = pipeline.start(config)
    with pytest.raises(BusyError):
        pipeline.start(config.replace(sweep={}, output_dir=str(tmp_path / "runs" / "other")))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trial = pipeline.current
        if trial is not None and any(e.get("type") == "train" and e["step"] >= 3 for e in trial.events(0)):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the first trial never trained")
    assert pipeline.job is sweep
    sweep.stop()
    assert sweep.wait(120)
    assert sweep.status is RunStatus.STOPPED
    record = SweepDir(root).read()
    assert [t["status"] for t in record["trials"]] == ["stopped", "queued"]
    stopped_at = RunDir(root / "trial-01").read()["global_step"]
    assert 3 <= stopped_at < 14 and not (root / "trial-02").exists()

    resumed = pipeline.start(load_sweep_config(root).replace(resume=True))
    assert resumed.wait(240)
    assert resumed.status is RunStatus.FINISHED, resumed.error
    record = SweepDir(root).read()
    assert [t["status"] for t in record["trials"]] == ["finished", "finished"] and record["best"]
    # The stopped trial continued its own curve from the checkpoint: every step once, up to the end.
    steps = [e["step"] for e in read_metrics(root / "trial-01" / "metrics.jsonl") if e["type"] == "train"]
    assert steps == list(range(1, 15))
    assert [Path(p).name for p in sweep_trial_dirs(root)] == ["trial-01", "trial-02"]


def test_answer_token_accuracy_compares_each_prediction_with_the_next_token():
    from transformers import EvalPrediction

    from autotuning.training.trainer import answer_token_accuracy

    labels = np.array([[-100, -100, 5, 6, 7], [-100, 3, 4, -100, -100]])
    # Position t predicts token t + 1: right for 5, 6 and 4, wrong for 7 and 3.
    predicted = np.array([[0, 5, 6, 1, 9], [2, 4, 9, 9, 9]])
    assert answer_token_accuracy(EvalPrediction(predicted, labels)) == {"accuracy": pytest.approx(3 / 5)}


def test_best_checkpoint_and_early_stopping_by_answer_token_accuracy(tmp_path):
    out = tmp_path / "by-accuracy"
    sets = ["max_steps=8", "eval_steps=2", "best_metric=accuracy", "load_best_model_at_end=true"]
    config = load_config(None, [*_FAST, *sets, f"output_dir={out}"])
    assert run_job(config, show_progress=False).status == "finished"
    evals = [e for e in read_metrics(out / "metrics.jsonl") if e["type"] == "eval"]
    assert evals and all(0.0 <= e["eval_accuracy"] <= 1.0 for e in evals)
    selection = RunDir(out).read()["checkpoint_selection"]
    assert selection["metric"] == "eval_accuracy" and selection["restored"]
    assert selection["best_value"] == pytest.approx(max(e["eval_accuracy"] for e in evals))
    with pytest.raises(ConfigError, match="sft"):
        load_config(None, ["best_metric=accuracy", "training_method=dpo"])
