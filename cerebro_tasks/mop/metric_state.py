"""Exact metrics over partitions: merge each metric's additive state, then compute it once.

A MOP epoch is P units, one per partition, and each reports its metrics. Averaging the P values
(even weighted by rows) is exact only for means; the balanced accuracy, AUC, precision, recall
and F1 of the union of the partitions are not any average of the partitions' own. Keras metrics
keep additive state (totals and counts, confusion counts per threshold, per-class counts), so a
worker reports that state with its metrics (``capture`` in mop/worker.py), the journal sums it
over an epoch's partitions, and :func:`result` computes the metric of the whole epoch from the
sum, with Keras' own formulas, in numpy: the driver never imports TensorFlow (a driver on a GPU
machine must not grab the card its workers need).

A metric whose class is not in :data:`RESULTS` keeps the old figure, the mean of the partitions'
values weighted by rows (``journal.histories``). Pure Python plus numpy, like the rest of the
engine's core.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

__all__ = ["CONFIG_KEYS", "RESULTS", "merge", "result", "supported"]

# the configuration a result needs, by Keras config key (everything else stays on the worker)
CONFIG_KEYS = ("curve", "summation_method", "multi_label", "label_weights", "num_thresholds", "beta", "average",
               "thresholds")
_EPSILON = 1e-7  # keras.backend.epsilon(), as the F-score uses it


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Keras' divide_no_nan: 0 where the denominator is 0."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    out = np.zeros_like(a)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _scalar_or_vector(values: np.ndarray) -> float | list[float]:
    values = np.asarray(values, np.float64).reshape(-1)
    return float(values[0]) if values.size == 1 else [float(v) for v in values]


def _mean(state: dict[str, np.ndarray], config: dict[str, Any]) -> float:
    return float(_div(state["total"], state["count"]))


def _precision(state: dict[str, np.ndarray], config: dict[str, Any]) -> float | list[float]:
    tp = state["true_positives"]
    return _scalar_or_vector(_div(tp, tp + state["false_positives"]))


def _recall(state: dict[str, np.ndarray], config: dict[str, Any]) -> float | list[float]:
    tp = state["true_positives"]
    return _scalar_or_vector(_div(tp, tp + state["false_negatives"]))


def _fbeta(state: dict[str, np.ndarray], config: dict[str, Any]) -> float | list[float]:
    tp, fp, fn = state["true_positives"], state["false_positives"], state["false_negatives"]
    beta2 = float(config.get("beta", 1.0)) ** 2
    precision = tp / (tp + fp + _EPSILON)
    recall = tp / (tp + fn + _EPSILON)
    score = (precision * recall) / (beta2 * precision + recall + _EPSILON) * (1 + beta2)
    average = config.get("average")
    if average == "weighted":
        weights = state["intermediate_weights"] / (np.sum(state["intermediate_weights"]) + _EPSILON)
        return float(np.sum(score * weights))
    if average is not None:  # micro (state already summed over classes by Keras) or macro
        return float(np.mean(score))
    return _scalar_or_vector(score)


def _auc(state: dict[str, np.ndarray], config: dict[str, Any]) -> float:
    tp, fp = state["true_positives"], state["false_positives"]
    tn, fn = state["true_negatives"], state["false_negatives"]
    curve = str(config.get("curve", "ROC")).upper()
    method = str(config.get("summation_method", "interpolation")).lower()
    n = tp.shape[0]
    if curve == "PR" and method == "interpolation":
        dtp = tp[: n - 1] - tp[1:]
        p = tp + fp
        dp = p[: n - 1] - p[1:]
        slope = _div(dtp, np.maximum(dp, 0))
        intercept = tp[1:] - slope * p[1:]
        both = (p[: n - 1] > 0) & (p[1:] > 0)
        ratio = np.where(both, _div(p[: n - 1], np.maximum(p[1:], 0)), 1.0)
        terms = _div(slope * (dtp + intercept * np.log(ratio)), np.maximum(tp[1:] + fn[1:], 0))
    else:
        recall = _div(tp, tp + fn)
        if curve == "ROC":
            x, y = _div(fp, fp + tn), recall
        elif curve == "PR":
            x, y = recall, _div(tp, tp + fp)
        else:
            raise ValueError(f"AUC curve {curve!r} has no exact merge here")
        if method == "interpolation":
            heights = (y[: n - 1] + y[1:]) / 2.0
        elif method == "minoring":
            heights = np.minimum(y[: n - 1], y[1:])
        else:  # majoring
            heights = np.maximum(y[: n - 1], y[1:])
        terms = (x[: n - 1] - x[1:]) * heights
    if config.get("multi_label"):
        by_label = np.sum(terms, axis=0)
        weights = config.get("label_weights")
        if weights is None:
            return float(np.mean(by_label))
        weights = np.asarray(weights, np.float64)
        return float(_div(np.sum(by_label * weights), np.sum(weights)))
    return float(np.sum(terms))


def _balanced_accuracy(state: dict[str, np.ndarray], config: dict[str, Any]) -> float:
    """cerebro_tasks' BalancedAccuracy: mean recall over the classes with support."""
    support, hits = state["support"], state["true_positives"]
    present = support > 0
    return float(np.mean(hits[present] / support[present])) if present.any() else 0.0


# Keras class name -> result from the summed state (the variables each reads, by name)
RESULTS: dict[str, Callable[[dict[str, np.ndarray], dict[str, Any]], Any]] = {
    "Precision": _precision,
    "Recall": _recall,
    "AUC": _auc,
    "F1Score": _fbeta,
    "FBetaScore": _fbeta,
    "BalancedAccuracy": _balanced_accuracy,
}


def supported(entry: dict[str, Any]) -> bool:
    """Whether a captured metric can be merged exactly: a known class, or a plain mean."""
    state = entry.get("state") or {}
    return entry.get("class") in RESULTS or set(state) == {"total", "count"}


def merge(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One captured metric summed over partitions (same class, configuration and state shapes)."""
    first = entries[0]
    for e in entries[1:]:
        if e["class"] != first["class"] or set(e["state"]) != set(first["state"]):
            raise ValueError(f"cannot merge {first['class']} state with {e['class']} state")
    state = {name: np.sum([np.asarray(e["state"][name], np.float64) for e in entries], axis=0)
             for name in first["state"]}
    return {"class": first["class"], "config": first.get("config", {}), "state": state}


def result(entry: dict[str, Any]) -> Any:
    """The metric computed from its (merged) state, as Keras' ``result()`` computes it."""
    state = {k: np.asarray(v, np.float64) for k, v in entry["state"].items()}
    if set(state) == {"total", "count"} and entry["class"] not in RESULTS:
        return _mean(state, {})
    value = RESULTS[entry["class"]](state, entry.get("config", {}))
    return value if not isinstance(value, float) or math.isfinite(value) else float("nan")
