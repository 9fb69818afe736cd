"""The MOP workload of Cerebro's API: any ``SparkEstimator`` on the store's prepared Parquet data.

Pickled once into the Spark job, so it holds only URLs and column names. What differs per model
(the initial weights, batch size, ``transformation_fn``, callbacks, custom objects) is read from the
run folder the first time a worker meets the model (see :mod:`cerebro_tasks.cerebro.estimator`),
which is what lets a TPE search add models after the workers started.
"""

from __future__ import annotations

import collections
import keyword
from dataclasses import dataclass
from typing import Any

import numpy as np

from cerebro_tasks.cerebro.data import data_files, empty_columns, files_of_partition, read_columns
from cerebro_tasks.cerebro.estimator import EXTRAS_NAME, INIT_NAME, MODELS_DIR, load_extras, pair_inputs
from cerebro_tasks.mop.workload import ModelSpec, UnitInputs
from cerebro_tasks.storage.store import Store

__all__ = ["EstimatorWorkload"]

# per worker process: (run_url, model_id) -> extras; run_url -> merged custom objects
_EXTRAS: dict[tuple[str, str], dict[str, Any]] = {}
_CUSTOM: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class EstimatorWorkload:
    train_url: str
    val_url: str | None
    run_url: str
    feature_columns: tuple[str, ...]
    label_columns: tuple[str, ...]
    num_workers: int

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([*self.feature_columns, *self.label_columns]))

    # Workload protocol ------------------------------------------------------------------------------
    def load_partition(self, kind: str, partition: int) -> dict[str, np.ndarray]:
        url = self.train_url if kind == "train" else self.val_url
        if not url:
            return empty_columns(self.columns)
        files = files_of_partition(data_files(url), partition, self.num_workers)
        return read_columns(url, files, self.columns)

    def build_model(self, spec: ModelSpec) -> Any:
        import keras

        extras = self._extras(spec.model_id)
        store = Store(self.run_url)
        with store.local_copy(MODELS_DIR, spec.model_id, INIT_NAME) as path:
            return keras.saving.load_model(path, custom_objects=extras["custom_objects"] or None)

    def inputs(self, data: dict[str, np.ndarray], spec: ModelSpec, *, training: bool, seed: int) -> UnitInputs:
        extras = self._extras(spec.model_id)
        info = extras["info"]
        n = len(data[self.feature_columns[0]]) if self.feature_columns else 0
        extra = {"callbacks": list(extras.get("callbacks") or [])}
        if n == 0:
            return UnitInputs(x=None, num_samples=0, extra=extra)
        if extras.get("transformation_fn") is not None:
            dataset = self._dataset(data, extras)
            return UnitInputs(x=dataset, y=None, num_samples=n, batch_size=None, extra=extra)
        order = np.random.default_rng(seed).permutation(n) if training else None
        by_name, pairs = pair_inputs(self.feature_columns, info["inputs"])
        xs = [_fit_array(data[c], t, order, is_label=False) for c, t in pairs]
        ys = [_fit_array(data[c], t, order, is_label=True) for c, t in zip(self.label_columns, info["outputs"])]
        return UnitInputs(x=_pack(xs, pairs, by_name), y=ys[0] if len(ys) == 1 else ys,
                          num_samples=n, batch_size=int(extras["batch_size"]), extra=extra)

    def custom_objects(self) -> dict[str, Any]:
        """Every custom object of every model of the run (a checkpoint may be loaded on any worker)."""
        store = Store(self.run_url)
        for model_id in store.listdir(MODELS_DIR):
            if (self.run_url, model_id) not in _EXTRAS and store.exists(MODELS_DIR, model_id, EXTRAS_NAME):
                self._extras(model_id)
        return dict(_CUSTOM.get(self.run_url, {}))

    # helpers ----------------------------------------------------------------------------------------
    def _extras(self, model_id: str) -> dict[str, Any]:
        key = (self.run_url, model_id)
        if key not in _EXTRAS:
            extras = load_extras(Store(self.run_url), model_id)
            _EXTRAS[key] = extras
            _CUSTOM.setdefault(self.run_url, {}).update(extras.get("custom_objects") or {})
        return _EXTRAS[key]

    def _dataset(self, data: dict[str, np.ndarray], extras: dict[str, Any]) -> Any:
        """Rows as a tf.data.Dataset of namedtuples -> transformation_fn -> batches of (x, y)."""
        import tensorflow as tf

        info = extras["info"]
        cols = self.columns
        if all(c.isidentifier() and not keyword.iskeyword(c) for c in cols):
            row_type = collections.namedtuple("Row", cols)
            elements: Any = row_type(**{c: data[c] for c in cols})
        else:  # column names a namedtuple cannot hold: dicts keyed by column
            elements = {c: data[c] for c in cols}
        dataset = tf.data.Dataset.from_tensor_slices(elements)
        dataset = extras["transformation_fn"](dataset)
        by_name, pairs = pair_inputs(self.feature_columns, info["inputs"])
        label_cols = self.label_columns

        def field(element: Any, col: str) -> Any:
            return getattr(element, col) if hasattr(element, "_fields") else element[col]

        def to_xy(element: Any) -> Any:
            if isinstance(element, tuple) and not hasattr(element, "_fields"):
                return element  # the function already made (x, y) pairs
            xs = [_fit_tensor(tf, field(element, c), t, False) for c, t in pairs]
            ys = [_fit_tensor(tf, field(element, c), t, True) for c, t in zip(label_cols, info["outputs"])]
            return _pack(xs, pairs, by_name), ys[0] if len(ys) == 1 else tuple(ys)

        return dataset.batch(int(extras["batch_size"])).map(to_xy).prefetch(tf.data.AUTOTUNE)


def _target_shape(info: dict[str, Any]) -> list[int] | None:
    shape = info["shape"][1:]
    return None if any(d is None for d in shape) else [int(d) for d in shape]


def _fit_array(arr: np.ndarray, info: dict[str, Any], order: np.ndarray | None, *, is_label: bool) -> np.ndarray:
    """Rows in training order, cast to the input's dtype and reshaped to its shape when sizes agree."""
    if order is not None:
        arr = arr[order]
    if not is_label and arr.dtype.kind in "fiub" and str(info.get("dtype", "")).startswith(("float", "int")):
        arr = arr.astype(info["dtype"], copy=False)
    elif is_label and arr.dtype.kind == "f":
        arr = arr.astype("float32", copy=False)
    target = _target_shape(info)
    if target is not None and list(arr.shape[1:]) != target and int(np.prod(arr.shape[1:])) == int(np.prod(target)):
        arr = arr.reshape((len(arr), *target))
    return arr


def _fit_tensor(tf: Any, t: Any, info: dict[str, Any], is_label: bool) -> Any:
    """The tf.data twin of :func:`_fit_array` for one batch."""
    numeric = t.dtype.is_floating or t.dtype.is_integer or t.dtype.is_bool
    if not is_label and numeric and str(info.get("dtype", "")).startswith(("float", "int")):
        t = tf.cast(t, info["dtype"])
    elif is_label and t.dtype == tf.float64:
        t = tf.cast(t, tf.float32)
    target = _target_shape(info)
    if target is not None:
        have = t.shape[1:]
        if have.is_fully_defined() and list(have) != target and int(np.prod(have)) == int(np.prod(target)):
            t = tf.reshape(t, [-1, *target])
    return t


def _pack(xs: list[Any], pairs: list[tuple[str, dict[str, Any]]], by_name: bool) -> Any:
    """One input: the array. Several: a dict by input name, or a list in the model's input order."""
    if len(xs) == 1:
        return xs[0]
    if by_name:
        return {info["name"]: x for x, (_, info) in zip(xs, pairs)}
    return list(xs)
