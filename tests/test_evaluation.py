from __future__ import annotations

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
