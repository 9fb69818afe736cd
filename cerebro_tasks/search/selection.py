"""Which model is best: the direction follows the metric (Cerebro picked the lowest accuracy)."""

from __future__ import annotations

import math
from typing import Any

_MAXIMISE = ("acc", "accuracy", "auc", "precision", "recall", "f1", "balanced_accuracy", "iou", "r2")


def metric_mode(metric: str) -> str:
    """'max' for scores (accuracy, AUC, ...), 'min' for losses and errors."""
    name = metric.lower()
    for prefix in ("val_", "train_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return "max" if any(name == m or name.endswith("_" + m) for m in _MAXIMISE) else "min"


def final_value(history: dict[str, list[float]], metric: str) -> float:
    """The metric after the last epoch; NaN when the model has no such value (failed, stopped early)."""
    series = history.get(metric) or []
    return float(series[-1]) if series else math.nan


def best_model(histories: dict[str, dict[str, list[float]]], metric: str) -> str:
    """The model id with the best final `metric`; NaN never wins; ties go to the first id."""
    mode = metric_mode(metric)
    scored = [(m, final_value(h, metric)) for m, h in histories.items()]
    scored = [(m, v) for m, v in scored if not math.isnan(v)]
    if not scored:
        raise ValueError(f"no model has a value for {metric!r}; metrics seen: "
                         f"{sorted({k for h in histories.values() for k in h})}")
    sign = -1.0 if mode == "max" else 1.0
    return min(scored, key=lambda mv: (sign * mv[1]))[0]


def rank(histories: dict[str, dict[str, list[float]]], metric: str) -> list[tuple[str, float]]:
    mode = metric_mode(metric)
    items: list[tuple[str, Any]] = [(m, final_value(h, metric)) for m, h in histories.items()]
    return sorted(items, key=lambda mv: (math.isnan(mv[1]), -mv[1] if mode == "max" else mv[1]))
