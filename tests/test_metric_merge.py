"""Exact metrics over partitions: the merged epoch figure is the metric of all the data at once.

A real Keras model is evaluated on three unequal partitions (with class weights), each
partition's metric state is captured as a MOP worker captures it, the journal merges them, and
every metric must equal Keras' own figure on the union of the partitions, to 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from cerebro_tasks.deeppostures.metrics import BalancedAccuracy  # noqa: E402
from cerebro_tasks.mop.journal import histories  # noqa: E402
from cerebro_tasks.mop.worker import capture_metric_states  # noqa: E402

SIZES = (50, 137, 313)  # unequal on purpose: a row-weighted mean of partition figures is not exact


def _data(seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    x = rng.normal(size=(n, 6)).astype("float32")
    # partitions differ in class balance, as subjects do
    shift = np.repeat([-1.0, 0.0, 1.2], SIZES)
    y = (x[:, 0] + 0.8 * rng.normal(size=n) + shift > 0.3).astype("float32")[:, None]
    w = np.where(y[:, 0] > 0, 2.0, 0.7).astype("float32")  # class weights
    return x, y, w


def _model() -> "keras.Model":
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="sgd", loss="binary_crossentropy",
                  weighted_metrics=["accuracy", keras.metrics.AUC(name="auc"),
                                    keras.metrics.AUC(curve="PR", name="pr_auc"), keras.metrics.Precision(),
                                    keras.metrics.Recall(), keras.metrics.F1Score(threshold=0.5),
                                    BalancedAccuracy()])
    return model


def test_merged_state_equals_the_metric_of_all_data_at_once() -> None:
    x, y, w = _data()
    model = _model()
    records = []
    bounds = np.cumsum((0,) + SIZES)
    for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        metrics = model.evaluate(x[a:b], y[a:b], sample_weight=w[a:b], batch_size=32, verbose=0, return_dict=True)
        records.append({"unit": {"model_id": "m", "epoch": 0, "kind": "val", "partition": p, "step": 3},
                        "metrics": {k: float(v) for k, v in metrics.items()},
                        "metric_state": capture_metric_states(model), "num_samples": int(b - a)})
    merged = {k[len("val_"):]: v[0] for k, v in histories(records, len(SIZES))["m"].items()}
    whole = model.evaluate(x, y, sample_weight=w, batch_size=32, verbose=0, return_dict=True)
    names = ("loss", "accuracy", "auc", "pr_auc", "precision", "recall", "f1_score", "balanced_accuracy")
    assert set(names) <= set(merged)
    for name in names:
        assert merged[name] == pytest.approx(float(whole[name]), abs=1e-6), name
    # and the figure this replaces, the row-weighted mean of the partitions' own, is not exact
    old = {name: sum(r["metrics"][name] * r["num_samples"] for r in records) / sum(SIZES) for name in names}
    assert all(abs(old[n] - float(whole[n])) > 1e-3 for n in ("auc", "balanced_accuracy", "f1_score", "precision"))


def test_a_journal_without_states_keeps_the_weighted_mean() -> None:
    records = [{"unit": {"model_id": "m", "epoch": 0, "kind": "val", "partition": p, "step": 2},
                "metrics": {"loss": loss}, "num_samples": n} for p, (loss, n) in enumerate([(1.0, 10), (4.0, 30)])]
    assert histories(records, 2)["m"]["val_loss"] == [pytest.approx(3.25)]
