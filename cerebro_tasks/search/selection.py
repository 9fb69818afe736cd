"""Which model is best, and at which epoch: the direction of a metric is explicit, never guessed.

A search's ``mode`` ("min" or "max") says which way its metric is better. When it is not given it
comes from :data:`KERAS_MODES`, a table of Keras' own metric names (plus this project's
``balanced_accuracy``); a name outside that table without a mode is an error naming the metric,
raised before any Spark job (Cerebro picked the lowest accuracy; an earlier version of this module
guessed from the name and minimised ``val_f1_score``).

``select`` says which epoch of a model counts: ``"last_epoch"`` (Cerebro's rule: the value after
the last epoch the model trained) or ``"best_epoch"`` (the best value of any of its epochs, and that
epoch's checkpoint is the one exported).
"""

from __future__ import annotations

import math
import re
from typing import Any

MODES = ("min", "max")
SELECTS = ("last_epoch", "best_epoch")

# Keras 3's metric and loss names (keras.metrics / keras.losses, string aliases and class names in
# snake case) with the direction in which they improve.
KERAS_MODES: dict[str, str] = {
    **{name: "max" for name in (
        "acc", "accuracy", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy",
        "top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy", "auc", "precision", "recall",
        "precision_at_recall", "recall_at_precision", "sensitivity_at_specificity",
        "specificity_at_sensitivity", "f1_score", "fbeta_score", "r2_score", "iou", "binary_iou", "mean_iou",
        "one_hot_iou", "one_hot_mean_iou", "cosine_similarity", "true_positives", "true_negatives",
        "balanced_accuracy")},
    **{name: "min" for name in (
        "loss", "mse", "mae", "mape", "msle", "mean_squared_error", "mean_absolute_error",
        "mean_absolute_percentage_error", "mean_squared_logarithmic_error", "root_mean_squared_error",
        "binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy",
        "binary_focal_crossentropy", "categorical_focal_crossentropy", "kl_divergence", "kld",
        "kullback_leibler_divergence", "poisson", "hinge", "squared_hinge", "categorical_hinge", "logcosh",
        "log_cosh", "huber", "huber_loss", "false_positives", "false_negatives", "ctc", "dice", "tversky")},
}
_COPY_SUFFIX = re.compile(r"_\d+$")  # Keras names a second instance of a metric `auc_1`


def metric_mode(metric: str, mode: str | None = None) -> str:
    """'max' or 'min' for ``metric`` (a history key like ``val_auc`` or a bare name like ``auc``).

    An explicit ``mode`` wins; without one the name must be in :data:`KERAS_MODES` (after dropping
    a ``val_``/``train_`` prefix and a copy suffix such as ``_1``; a multi-output prefix such as
    ``out_accuracy`` is matched by its known tail). Raises ValueError otherwise.
    """
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return mode
    name = metric.lower()
    for prefix in ("val_", "train_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    for candidate in (name, _COPY_SUFFIX.sub("", name)):
        if candidate in KERAS_MODES:
            return KERAS_MODES[candidate]
        tails = [k for k in KERAS_MODES if candidate.endswith("_" + k)]
        if tails:
            return KERAS_MODES[max(tails, key=len)]
    raise ValueError(f"metric {metric!r} is not one of Keras' metric names, so whether higher or lower is better "
                     f"is unknown: give mode='min' or mode='max'")


def epoch_value(history: dict[str, list[float]], metric: str, mode: str, select: str = "last_epoch"
                ) -> tuple[int, float]:
    """(epoch, value) of ``metric`` that counts for a model: its last epoch, or its best one.

    (-1, NaN) when the model has no finite value (failed before its first epoch, diverged).
    """
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    series = history.get(metric) or []
    finite = [(e, float(v)) for e, v in enumerate(series) if v is not None and not math.isnan(float(v))]
    if not finite:
        return -1, math.nan
    if select == "last_epoch":
        e, v = len(series) - 1, float(series[-1])
        return (e, v) if not math.isnan(v) else (-1, math.nan)
    sign = -1.0 if mode == "max" else 1.0
    return min(finite, key=lambda ev: (sign * ev[1], ev[0]))  # ties: the earliest epoch


def final_value(history: dict[str, list[float]], metric: str) -> float:
    """The metric after the last epoch; NaN when the model has no such value (failed, stopped early)."""
    series = history.get(metric) or []
    return float(series[-1]) if series else math.nan


def best_model(histories: dict[str, dict[str, list[float]]], metric: str, mode: str | None = None,
               select: str = "last_epoch") -> str:
    """The model id with the best `metric` (see ``select``); NaN never wins; ties go to the first id."""
    ranked = rank(histories, metric, mode, select)
    if not ranked or math.isnan(ranked[0][1]):
        raise ValueError(f"no model has a value for {metric!r}; metrics seen: "
                         f"{sorted({k for h in histories.values() for k in h})}")
    return ranked[0][0]


def rank(histories: dict[str, dict[str, list[float]]], metric: str, mode: str | None = None,
         select: str = "last_epoch") -> list[tuple[str, float]]:
    """(model id, value) best first; models without a value last, in id order."""
    mode = metric_mode(metric, mode)
    items: list[tuple[str, Any]] = [(m, epoch_value(h, metric, mode, select)[1]) for m, h in histories.items()]
    return sorted(items, key=lambda mv: (math.isnan(mv[1]), -mv[1] if mode == "max" else mv[1]))
