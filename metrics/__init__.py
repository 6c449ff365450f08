"""Metrics as local `evaluate` modules, loaded by path: `evaluate.load("accuracy")` would download a script."""

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    return sorted(path.stem for path in METRICS_DIR.glob("*.py") if not path.stem.startswith("_"))


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Loads the metric `name` shipped in this folder (e.g. "trajectory_l2"), never from the Hub."""
    if name not in available_metrics():
        raise ValueError(f"Unknown metric {name!r}; vlmheads ships {available_metrics()}.")
    return evaluate.load(str(METRICS_DIR / f"{name}.py"), **kwargs)
