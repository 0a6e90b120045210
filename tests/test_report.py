"""The run report from a hand-written run directory (no training): what the templates escape, and that both
files come from one read of the run directory. Reports of real runs are checked in test_evaluation/test_export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autotuning import report
from autotuning.report import data as report_data

ANSWER = "<script>alert('x')</script> a|b"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "merged" / "model.safetensors").write_bytes(b"weights")
    record = {
        "status": "finished",
        "model_name": "builtin:tiny-llama",
        "eval_results": {"eval_loss": 1.5, "base_eval_loss": 3.0},
        "exports": {
            "torch": {"path": str(run / "merged"), "status": "unverified", "reason": "rel diff <b>0.5</b> > 0.01"}
        },
        "oom_retries": [{"step": 3, "change": "batch 8 -> 4"}],
    }
    (run / "run.json").write_text(json.dumps(record), encoding="utf-8")
    events = [
        {"type": "train", "step": 1, "loss": 2.0, "learning_rate": 0.01},
        {"type": "eval", "step": 1, "eval_loss": 1.9},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    prediction = {"prompt": "Say it\non two lines", "reference": ANSWER, "prediction": "ok", "base_prediction": None}
    (run / "predictions.jsonl").write_text(json.dumps(prediction) + "\n", encoding="utf-8")
    (run / "config.yaml").write_text("model:\n  hub_token: hf_secret\n", encoding="utf-8")
    return run


def test_html_escapes_what_the_run_recorded_and_markdown_keeps_it_as_text(run_dir):
    html_path, md_path = report.write_report(run_dir)
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")

    assert "<script>alert" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; a|b" in html
    assert "<b>0.5</b>" not in html and "rel diff &lt;b&gt;0.5&lt;/b&gt; &gt; 0.01" in html
    assert "retried with batch 8 -&gt; 4." in html
    assert "id='export-torch-unverified'" in html and 'id="loss-chart"' in html  # the chart itself is not escaped
    assert "<script src=" not in html  # plotly.js inlined

    assert "| <script>alert('x')</script> a\\|b |" in md  # one pipe-table cell, its pipe escaped
    assert "| Say it on two lines |" in md
    assert "**torch export unverified:** rel diff <b>0.5</b> > 0.01." in md
    for text in (html, md):
        assert "hf_secret" not in text and "hub_token: ***" in text


def test_both_files_come_from_one_read_of_the_run_directory(run_dir, monkeypatch):
    calls = []
    real = report_data.build_report

    def counted(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr("autotuning.report.render.build_report", counted)
    report.write_report(run_dir)
    assert len(calls) == 1
    assert not list(run_dir.glob(".*.tmp"))  # written atomically, nothing left behind


def test_a_run_that_recorded_almost_nothing_still_gets_both_files(tmp_path):
    """A run that failed before training writes only a bare run.json; the templates must not need more."""
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed"}), encoding="utf-8")
    html_path, md_path = report.write_report(tmp_path)
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    assert "no metric events" in html and "no evaluation results" in html and "no exports" in html
    assert "Status **failed**" in md and "no evaluation results" in md and "no exports" in md
