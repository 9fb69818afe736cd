"""Balanced accuracy (mean per-class recall) for per-step sequence outputs.

DeepPostures data are about 80 % sitting, so plain accuracy rewards a model that always says
"sitting"; balanced accuracy is the quality figure users read (shared/reference/deeppostures.md).

Two implementations that must agree (tests check it):

* :class:`BalancedAccuracy`, a stateful Keras 3 metric that accumulates per-class true-positive
  and support counts over batches, so the epoch figure is exact rather than an average of
  per-batch figures (Cerebro's batch-count weighting is one of the defects we do not copy).
* :func:`balanced_accuracy`, a numpy version for reports and for checking the metric.

Both honour sample weights: a weight of 0 masks a step. Labels outside ``[0, num_classes)``
(DeepPostures' ``-1`` "no label") are ignored as well, so a stray unlabelled step can never
count as an error.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

__all__ = ["BalancedAccuracy", "balanced_accuracy", "predicted_classes"]


def predicted_classes(y_pred: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class ids from model outputs, numpy version.

    ``(..., C)`` with ``C >= 2`` (probabilities or logits: the argmax is the same) -> argmax;
    ``(..., 1)`` -> ``y_pred[..., 0] > threshold`` (one probability of class 1; use
    ``threshold=0`` for a single logit). Integer input of any shape is returned unchanged.
    """
    y_pred = np.asarray(y_pred)
    if np.issubdtype(y_pred.dtype, np.integer) or y_pred.dtype == np.bool_:
        return y_pred.astype(np.int64)
    if y_pred.shape[-1] == 1:
        return (y_pred[..., 0] > threshold).astype(np.int64)
    return np.argmax(y_pred, axis=-1).astype(np.int64)


def balanced_accuracy(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    sample_weight: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    threshold: float = 0.5,
) -> float:
    """Mean recall over the classes that appear in ``y_true`` (with non-zero weight).

    Args:
        y_true: integer labels, any shape, e.g. ``(B, T)``.
        y_pred: class ids with the shape of ``y_true``, or scores ``y_true.shape + (C,)``
            (see :func:`predicted_classes`).
        sample_weight: optional weights broadcastable to ``y_true``; 0 masks a step.
        num_classes: classes counted; default ``max(y_true) + 1``. Labels outside
            ``[0, num_classes)`` are ignored.
        threshold: decision threshold for a single-column score.

    Returns:
        The balanced accuracy, or ``nan`` when no class has support (nothing to score).
    """
    y_true = np.asarray(y_true).astype(np.int64)
    y_hat = np.asarray(y_pred)
    if y_hat.ndim == y_true.ndim + 1:
        y_hat = predicted_classes(y_hat, threshold)
    y_hat = y_hat.astype(np.int64).reshape(y_true.shape)
    w = (
        np.ones(y_true.shape, dtype=np.float64)
        if sample_weight is None
        else np.broadcast_to(_expand_to(np.asarray(sample_weight, np.float64), y_true.ndim), y_true.shape)
    )
    if num_classes is None:
        num_classes = int(y_true.max()) + 1 if y_true.size else 0
    valid = (y_true >= 0) & (y_true < num_classes) & (w != 0)
    t, p, w = y_true[valid], y_hat[valid], w[valid]
    support = np.bincount(t, weights=w, minlength=num_classes)
    hits = np.bincount(t, weights=w * (p == t), minlength=num_classes)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(hits[present] / support[present]))


def _expand_to(w: np.ndarray, ndim: int) -> np.ndarray:
    """Append trailing axes so per-sequence weights ``(B,)`` broadcast against ``(B, T)``."""
    while w.ndim < ndim:
        w = w[..., None]
    return w


@keras.saving.register_keras_serializable(package="cerebro_tasks")
class BalancedAccuracy(keras.metrics.Metric):
    """Stateful balanced accuracy for per-step outputs.

    ``y_true``: ``(B, T)`` (or ``(B, T, 1)``) integer labels. ``y_pred``: ``(B, T, C)`` scores
    with ``C >= 2`` (argmax; logits or probabilities alike) or ``(B, T, 1)`` (one score of class
    1 compared with ``threshold``: 0.5 for a probability, 0.0 for a logit). Any rank works as long
    as ``y_pred`` has one more axis than ``y_true``.

    State: per-class weighted support and true positives. ``result()`` is the mean recall over
    classes with non-zero support, 0 before any update.

    Put it in ``weighted_metrics`` when steps are masked with sample weight 0: Keras 3 passes
    sample weights only to ``weighted_metrics``. Class-balancing weights that are constant per
    class leave every per-class recall (and so this metric) unchanged.
    """

    def __init__(
        self,
        num_classes: int = 2,
        threshold: float = 0.5,
        name: str = "balanced_accuracy",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        # A single-column output is a binary problem: two classes to count.
        self.num_classes = max(int(num_classes), 2)
        self.threshold = float(threshold)
        self.true_positives = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", dtype="float32", name="true_positives"
        )
        self.support = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", dtype="float32", name="support"
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Accumulate per-class support and hits of one batch."""
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == 1:
            y_true = ops.squeeze(y_true, axis=-1)  # (B, T, 1) labels -> (B, T)
        if y_pred.shape[-1] == 1:
            y_hat = ops.cast(ops.greater(y_pred[..., 0], self.threshold), "int32")
        else:
            y_hat = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        y_true = ops.cast(y_true, "int32")
        y_true = ops.reshape(y_true, (-1,))
        y_hat = ops.reshape(y_hat, (-1,))

        label_shape = ops.shape(y_pred)[:-1]
        if sample_weight is None:
            w = ops.ones_like(y_true, dtype="float32")
        else:
            w = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
            rank = len(y_pred.shape) - 1
            if len(w.shape) > rank:  # (B, T, 1) weights
                w = ops.reshape(w, label_shape)
            while len(w.shape) < rank:  # per-sequence (B,) weights cover all its steps
                w = ops.expand_dims(w, -1)
            w = ops.reshape(ops.broadcast_to(w, label_shape), (-1,))

        # Labels outside [0, C) (e.g. -1, "no label") are ignored rather than miscounted.
        valid = ops.logical_and(ops.greater_equal(y_true, 0), ops.less(y_true, self.num_classes))
        w = ops.where(valid, w, ops.zeros_like(w))
        safe_true = ops.where(valid, y_true, ops.zeros_like(y_true))
        onehot = ops.one_hot(safe_true, self.num_classes, dtype="float32") * w[:, None]
        hit = ops.cast(ops.equal(y_hat, y_true), "float32")
        self.support.assign_add(ops.sum(onehot, axis=0))
        self.true_positives.assign_add(ops.sum(onehot * hit[:, None], axis=0))

    def result(self) -> Any:
        """Mean recall over classes seen so far (0 before any labelled step)."""
        present = ops.greater(self.support, 0.0)
        recall = ops.divide_no_nan(self.true_positives, self.support)
        n_present = ops.sum(ops.cast(present, "float32"))
        return ops.divide_no_nan(ops.sum(ops.where(present, recall, 0.0)), n_present)

    def reset_state(self) -> None:
        """Zero the counts (Keras calls it at the start of every epoch and evaluation)."""
        self.true_positives.assign(ops.zeros((self.num_classes,), dtype="float32"))
        self.support.assign(ops.zeros((self.num_classes,), dtype="float32"))

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, for ``.keras`` save/load."""
        return {**super().get_config(), "num_classes": self.num_classes, "threshold": self.threshold}
