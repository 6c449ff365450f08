"""Macro-averaged F1 of class predictions: the unweighted mean of the per-class F1 scores."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Macro F1: the F1 score (harmonic mean of precision and recall) of each class, averaged with equal weight per
class, so that rare classes count as much as frequent ones. The classes are `0 ... num_labels - 1` when
`num_labels` is given, else those that occur in the references or the predictions. A class that is never
predicted and never true does not count; one with no true positive scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: (N,) predicted class ids.
    references: (N,) true class ids.
    num_labels: number of classes (optional).
Returns:
    {"macro_f1": ..., "f1_per_class": [...]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MacroF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_labels=None):
        predicted, true = np.asarray(predictions), np.asarray(references)
        if predicted.shape != true.shape or predicted.size == 0:
            raise ValueError(
                f"predictions and references must be non-empty and alike, got {predicted.shape} and {true.shape}."
            )
        classes = np.arange(num_labels) if num_labels is not None else np.union1d(predicted, true)
        scores = []
        for label in classes:
            true_positives = np.sum((predicted == label) & (true == label))
            predicted_count, true_count = np.sum(predicted == label), np.sum(true == label)
            if predicted_count + true_count == 0:
                continue
            scores.append(2 * true_positives / (predicted_count + true_count))
        return {"macro_f1": float(np.mean(scores)), "f1_per_class": [float(score) for score in scores]}
