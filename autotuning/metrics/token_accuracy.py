"""Token accuracy: the share of answer tokens whose next-token prediction was right.

An `evaluate` metric module shipped with autotuning (Hub metric names do not load offline).
Inputs are flat lists of token ids, already shifted and restricted to answer positions.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of positions where the predicted token id equals the reference token id."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of int, predicted token ids.
    references: list of int, reference token ids (same length).
Returns:
    accuracy: float in [0, 1].
Example:
    >>> metric.compute(predictions=[1, 2, 3], references=[1, 2, 4])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if not references:
            return {"accuracy": 0.0}
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references)}
