"""Planning metrics of a predicted ego trajectory: L2 error at 1 s / 2 s / 3 s, ADE and FDE."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
L2 displacement errors between predicted and true future ego waypoints, in the waypoints' unit (metres).
`L2@Ts` is the error at T seconds (`convention="point"`, as in UniAD) or the mean error over the waypoints up to
T seconds (`convention="stp3"`, as in ST-P3 and the ORION open-loop numbers). ADE is the mean error over all
waypoints, FDE the error at the last one.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: (N, T, D) predicted waypoints.
    references: (N, T, D) true waypoints.
    waypoint_hz: waypoints per second (default 2: six waypoints cover 3 s).
    horizons: seconds at which to report L2 (default (1, 2, 3)).
    convention: "point" (default) or "stp3".
Returns:
    {"L2@1s": ..., "L2@2s": ..., "L2@3s": ..., "ADE": ..., "FDE": ...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TrajectoryL2(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        waypoints = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": waypoints, "references": waypoints}),
        )

    def _compute(self, predictions, references, waypoint_hz=2, horizons=(1, 2, 3), convention="point"):
        predicted, true = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        if predicted.shape != true.shape or predicted.ndim != 3:
            raise ValueError(
                f"predictions and references must both be (N, T, D), got {predicted.shape} and {true.shape}."
            )
        if convention not in ("point", "stp3"):
            raise ValueError(f'convention must be "point" or "stp3", got {convention!r}.')
        errors = np.linalg.norm(predicted - true, axis=-1)
        results = {}
        for seconds in horizons:
            steps = round(seconds * waypoint_hz)
            if not 1 <= steps <= errors.shape[1]:
                raise ValueError(f"{seconds} s is beyond the {errors.shape[1]} waypoints at {waypoint_hz} Hz.")
            window = errors[:, steps - 1] if convention == "point" else errors[:, :steps].mean(axis=1)
            results[f"L2@{seconds:g}s"] = float(window.mean())
        results["ADE"] = float(errors.mean())
        results["FDE"] = float(errors[:, -1].mean())
        return results
