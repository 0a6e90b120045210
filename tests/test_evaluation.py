from __future__ import annotations

import csv
import hashlib
import json
import math

import datasets
import pytest
import torch

from autotuning.evaluation import evaluate_answers, load_metric, save_eval_results, shifted_answer_predictions


def test_shift_scores_the_next_token():
    # Three positions; the model at position t predicts token t+1. Labels: prompt token, then answer 2, 3.
    logits = torch.full((1, 3, 5), -10.0)
    logits[0, 0, 2] = 10.0  # after token 0, predicts 2 (correct: label[1] == 2)
    logits[0, 1, 4] = 10.0  # after token 1, predicts 4 (wrong: label[2] == 3)
    logits[0, 2, 0] = 10.0  # last position predicts beyond the sequence: never scored
    labels = torch.tensor([[-100, 2, 3]])
    preds, refs, losses = shifted_answer_predictions(logits, labels)
    assert preds.tolist() == [2, 4] and refs.tolist() == [2, 3]
    assert losses[0] < 1e-3 and losses[1] > 10
    # The unshifted comparison (the seed's bug) would have scored position 0 against a masked label.


def test_shipped_metric_modules_work_offline():
    acc = load_metric("token_accuracy")
    f1 = load_metric("token_f1")
    assert acc.compute(predictions=[1, 2, 3], references=[1, 2, 4])["accuracy"] == pytest.approx(2 / 3)
    # class 1: P=1/2 R=1 F1=2/3; class 2: P=1 R=1/2 F1=2/3 -> macro 2/3
    assert f1.compute(predictions=[1, 1, 2], references=[1, 2, 2])["f1"] == pytest.approx(2 / 3)
    assert f1.compute(predictions=[5, 6], references=[5, 6])["f1"] == pytest.approx(1.0)


class _Oracle(torch.nn.Module):
    """Predicts the next token of a fixed sequence perfectly: accuracy 1, loss ~0."""

    def __init__(self, vocab: int = 8):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        nxt = torch.roll(input_ids, shifts=-1, dims=1)
        logits = torch.full((*input_ids.shape, self.vocab), -20.0) + self.dummy
        logits.scatter_(2, nxt.unsqueeze(-1), 20.0)
        return type("Out", (), {"logits": logits})()


def test_evaluate_answers_on_an_oracle(tmp_path):
    rows = [
        {"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]},
        {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
    ]
    tok = type("Tok", (), {"pad_token_id": 0})()
    results = evaluate_answers(_Oracle(), datasets.Dataset.from_list(rows), tok, batch_size=2)
    assert results["accuracy"] == 1.0 and results["f1"] == 1.0
    assert results["eval_tokens"] == 4 and results["eval_loss"] < 1e-6
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    for fmt in ("json", "csv"):
        path = save_eval_results(results, tmp_path, fmt)
        assert path.name == f"eval_results.{fmt}" and "accuracy" in path.read_text()


from autotuning.evaluation import (  # noqa: E402
    chosen_option,
    code_parses,
    exact_match,
    generation_metrics,
    normalize_answer,
    squad_f1,
)


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0  # any of the references
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert squad_f1("in Paris France", ["Paris"]) == pytest.approx(0.5)  # P=1/3, R=1
    assert squad_f1("Paris", ["London", "Paris"]) == 1.0
    assert squad_f1("", ["Paris"]) == 0.0


def test_rouge_l_on_known_strings():
    rouge = load_metric("rouge_l")
    # LCS("the cat sat", "the cat sat down") = 3: P = 1, R = 3/4, F = 6/7.
    assert rouge.compute(predictions=["the cat sat"], references=[["the cat sat down"]])["rougeL"] == pytest.approx(
        6 / 7
    )
    assert rouge.compute(predictions=["a b c"], references=[["x y", "c b a"]])["rougeL"] == pytest.approx(1 / 3)
    assert rouge.compute(predictions=["Same text."], references=[["same text"]])["rougeL"] == pytest.approx(1.0)


def test_code_parses_without_running_anything(tmp_path):
    marker = tmp_path / "ran"
    assert code_parses(f"```python\nopen({str(marker)!r}, 'w').write('x')\n```")
    assert not marker.exists()  # parsed, never executed
    assert not code_parses("def broken(:\n    pass")
    assert code_parses("x = [i * i for i in range(3)]")


def test_multiple_choice_picks_the_option():
    choices = ["Mercury", "Venus", "Mars", "Jupiter"]
    assert chosen_option("Mars", choices) == "Mars"
    assert chosen_option("I believe the answer is mars", choices) == "Mars"
    assert chosen_option("no idea", choices) is None
    metrics = generation_metrics(
        "question_answering",
        [
            {"prediction": "Mars", "references": ["Mars"], "choices": choices},
            {"prediction": "Venus", "references": ["Jupiter"], "choices": choices},
        ],
    )
    assert metrics["exact_match"] == 0.5 and metrics["choice_accuracy"] == 0.5 and metrics["f1"] == 0.5


def test_code_generation_metrics():
    samples = [
        {"prediction": "```python\nprint(1)\n```", "references": ["```python\nprint(1)\n```"], "choices": []},
        {"prediction": "def f(:", "references": ["def f():\n    return 1"], "choices": []},
    ]
    metrics = generation_metrics("code_generation", samples)
    assert metrics["python_parses"] == 0.5 and 0 < metrics["rougeL"] <= 1 and metrics["exact_match"] == 0.5


def test_csv_puts_base_and_tuned_side_by_side(tmp_path):
    from autotuning.evaluation import save_eval_results

    path = save_eval_results(
        {"accuracy": 0.5, "base_accuracy": 0.25, "eval_rows": 3, "base_eval_rows": 3}, tmp_path, "csv"
    )
    assert path.read_text().splitlines() == ["metric,tuned,base", "accuracy,0.5,0.25", "eval_rows,3,3"]


def test_tiny_model_memorises_qa_rows_tuned_exact_match_beats_base(tmp_path, jsonl):
    """Trained on a handful of repeated QA rows, the tuned model answers them; the base does not.

    It trains in fp32: the subject is learning, not the CPU's bf16 kernels (with bf16 autocast the same test got
    0/8 on an Intel Xeon with AMX-BF16 and 5/8 on an AMD EPYC with AVX512-BF16). The schedule is chosen far from
    the edge: 60 steps at 6e-3 memorised 8/8 on one CPU and 5/8 on another (an AMD EPYC without AVX-512: the
    same fp32 run rounds differently there), and over seeds 42, 1, 2, 3, 7 it gave 8, 4, 2, 7 and 1 of 8 with a
    linear decay; a cosine decay of 4e-3 over 120 steps gave 5 to 8 of 8. 120 steps at 3e-3 with a linear
    decay memorised 8/8 at every one of those seeds (held-out answer loss 0.017 to 0.13).
    """
    from autotuning.config import load_config
    from autotuning.recipe import run_job

    facts = [
        ("Who wrote the letter?", "Mara"),
        ("What colour was the door?", "green"),
        ("Which city hosted the fair?", "Lisbon"),
        ("How many boats were in the harbour?", "seven"),
    ]
    context = "Mara wrote the letter. The door was green. The fair was in Lisbon. Seven boats were in the harbour."
    path = jsonl([{"context": context, "question": q, "answer": a} for q, a in facts] * 25)
    sets = {
        "fine_tuning_type": "question_answering",
        "dataset_path": path,
        "output_dir": tmp_path / "run",
        "peft_type": "none",
        "max_steps": 120,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "linear",
        "precision": "fp32",
        "warmup_ratio": 0,
        "per_device_train_batch_size": 8,
        "max_seq_length": 256,
        "eval_split": 0.1,
        "eval_generations": 8,
        "eval_max_new_tokens": 12,
        "eval_save_format": "csv",
    }
    result = run_job(load_config(None, [f"{k}={v}" for k, v in sets.items()]), show_progress=False)
    assert result.status == "finished"
    with (result.run_dir / "eval_results.csv").open(encoding="utf-8") as fh:
        rows = {r["metric"]: r for r in csv.DictReader(fh)}
    tuned, base = float(rows["gen_exact_match"]["tuned"]), float(rows["gen_exact_match"]["base"])
    assert tuned >= 0.75 and tuned > base, rows["gen_exact_match"]
    assert float(rows["gen_f1"]["tuned"]) > float(rows["gen_f1"]["base"])
    assert float(rows["eval_loss"]["tuned"]) < float(rows["eval_loss"]["base"])
    predictions = [json.loads(line) for line in (result.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and {"prompt", "reference", "prediction", "base_prediction"} <= set(predictions[0])

    # The run report: curves (plotly inlined), the base-vs-tuned table, predictions, export checksums.
    report = (result.run_dir / "report.html").read_text(encoding="utf-8")
    assert 'id="loss-chart"' in report and "Plotly.newPlot" in report
    assert "<script src=" not in report  # self-contained: opens offline
    assert "gen_exact_match" in report and "fine-tuned" in report and "Lisbon" in report
    sha = hashlib.sha256((result.run_dir / "merged" / "model.safetensors").read_bytes()).hexdigest()
    assert sha in report
    markdown = (result.run_dir / "report.md").read_text(encoding="utf-8")
    assert "| gen_exact_match |" in markdown and sha in markdown
