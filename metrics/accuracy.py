"""Accuracy of class predictions: the fraction of predictions equal to their reference."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy: the fraction of samples whose predicted class id equals the reference class id.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: (N,) predicted class ids.
    references: (N,) true class ids.
Returns:
    {"accuracy": ...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predicted, true = np.asarray(predictions), np.asarray(references)
        if predicted.shape != true.shape or predicted.size == 0:
            raise ValueError(
                f"predictions and references must be non-empty and alike, got {predicted.shape} and {true.shape}."
            )
        return {"accuracy": float((predicted == true).mean())}
