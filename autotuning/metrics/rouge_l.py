"""ROUGE-L F-measure over whitespace tokens (longest common subsequence), as an `evaluate` module.

Shipped with autotuning because Hub metric names (``evaluate.load("rouge")``) do not load offline.
Text is lower-cased and split on whitespace after stripping punctuation at token edges; the score
for a prediction is the best over its references.
"""

import datasets
import evaluate

_DESCRIPTION = "ROUGE-L F-measure (LCS of word tokens), best over the references of each prediction, averaged."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str.
    references: list of list of str (one or more references per prediction).
Returns:
    rougeL: float in [0, 1].
Example:
    >>> metric.compute(predictions=["the cat sat"], references=[["the cat sat down"]])
    {'rougeL': 0.8571428571428571}
"""


_PUNCT = ".,;:!?\"'()[]{}"


def _tokens(text):
    return [t.strip(_PUNCT).lower() for t in text.split() if t.strip(_PUNCT)]


def _lcs(a, b):
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction, reference):
    p, r = _tokens(prediction), _tokens(reference)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"rougeL": 0.0}
        scores = [max(rouge_l(p, r) for r in refs) if refs else 0.0 for p, refs in zip(predictions, references)]
        return {"rougeL": sum(scores) / len(scores)}
