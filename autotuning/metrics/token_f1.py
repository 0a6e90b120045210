"""Token F1: macro-averaged F1 over the token ids that occur in the references or predictions.

An `evaluate` metric module shipped with autotuning. Each token id is a class; per-class F1 is
averaged with equal weight, so rare answer tokens count as much as frequent ones (unlike
accuracy, which frequent tokens such as punctuation dominate).
"""

from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "Macro-averaged F1 over token-id classes present in references or predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of int, predicted token ids.
    references: list of int, reference token ids (same length).
Returns:
    f1: float in [0, 1].
Example:
    >>> metric.compute(predictions=[1, 1, 2], references=[1, 2, 2])
    {'f1': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        true_pos: Counter = Counter()
        pred_count: Counter = Counter(predictions)
        ref_count: Counter = Counter(references)
        for p, r in zip(predictions, references):
            if p == r:
                true_pos[p] += 1
        classes = set(pred_count) | set(ref_count)
        if not classes:
            return {"f1": 0.0}
        total = 0.0
        for c in classes:
            tp = true_pos[c]
            denom = pred_count[c] + ref_count[c]
            total += (2.0 * tp / denom) if denom else 0.0
        return {"f1": total / len(classes)}
