"""Cerebro's ``SparkEstimator``: a Keras 3 model with how to train it, and how it reaches the workers.

A search calls the user's ``estimator_gen_fn(params)`` on the driver (as Cerebro did), then
publishes each estimator into the run folder before MOP starts training it::

    <run>/models/<model_id>/init.keras        the compiled model with its initial weights
    <run>/models/<model_id>/estimator.pkl     batch size, callbacks, transformation_fn, custom objects
    <run>/models/<model_id>/model_info.json   inputs/outputs (names, shapes, dtypes), columns, params

Workers build nothing from user code: they load ``init.keras``, so the weights a model starts from
are exactly the ones made on the driver under the model's seed. Functions and classes the user
defined in a module the workers cannot import (a script, a test module) are pickled by value.
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys
import sysconfig
import tempfile
import threading
import time
from typing import Any, Mapping, Sequence

from cerebro_tasks.storage.store import Store
from cerebro_tasks.storage import layout

__all__ = ["SparkEstimator", "publish_estimator", "load_extras", "pair_inputs", "MODELS_DIR", "INIT_NAME", "EXTRAS_NAME",
           "INFO_NAME", "dumps_user_objects"]

MODELS_DIR = layout.MODELS_DIR
INIT_NAME = layout.INIT_MODEL
EXTRAS_NAME = layout.ESTIMATOR_EXTRAS
INFO_NAME = layout.MODEL_INFO

_ids = itertools.count()
_ids_lock = threading.Lock()


def _next_run_id() -> str:
    with _ids_lock:
        n = next(_ids)
    return f"model_{n}_{int(time.time())}"  # Cerebro's form; a search replaces it with a stable id


_UNSET = object()


class SparkEstimator:
    """A Keras model plus its training settings, as Cerebro's ``SparkEstimator``.

    :param model: a Keras 3 model (``keras.Model``/``tf.keras.Model``). Its inputs take the feature
        columns in order (with several inputs, an input whose name is a feature column gets that
        column); its outputs take the label columns in order.
    :param custom_objects: names -> custom layers, losses, metrics, needed to load checkpoints.
    :param optimizer: a Keras optimizer (instance or name); default: the compiled model's.
    :param loss: a Keras loss (or list, one per output). Required.
    :param batch_size: rows per batch (default 32).
    :param loss_weights: optional weights of the losses of several outputs.
    :param metrics: Keras metrics to record (``'acc'``, ``'accuracy'``, objects...).
    :param callbacks: Keras callbacks, handed to each training unit (see docs/cerebro-api.md).
    :param transformation_fn: ``tf.data.Dataset -> tf.data.Dataset`` applied to a worker's rows
        before batching. Each element is a namedtuple of the feature and label columns (Petastorm's
        row form, as in Cerebro); the function may return namedtuples, dicts keyed by column, or
        ``(x, y)`` pairs. With a ``transformation_fn`` the rows keep their stored order (windowing
        functions need it); shuffle inside the function if wanted.
    """

    def __init__(self, model: Any = None, custom_objects: Mapping[str, Any] | None = None, optimizer: Any = None,
                 loss: Any = None, batch_size: int | None = None, loss_weights: Any = None,
                 metrics: Sequence[Any] | None = None, callbacks: Sequence[Any] | None = None,
                 transformation_fn: Any = None) -> None:
        self._params: dict[str, Any] = {
            "model": None, "custom_objects": {}, "optimizer": None, "loss": None, "batch_size": 32,
            "loss_weights": None, "metrics": [], "callbacks": [], "transformation_fn": None,
            "feature_cols": None, "label_cols": None, "store": None, "hyper_params": {}, "verbose": 1,
            "epochs": 0, "run_id": _next_run_id(), "validation": None,
        }
        self.setParams(model=model, custom_objects=custom_objects, optimizer=optimizer, loss=loss,
                       batch_size=batch_size, loss_weights=loss_weights, metrics=metrics, callbacks=callbacks,
                       transformation_fn=transformation_fn)

    def __repr__(self) -> str:
        return f"SparkEstimator(run_id={self.getRunId()!r}, batch_size={self.getBatchSize()}, loss={self.getLoss()!r})"

    # Cerebro's Params-style accessors ------------------------------------------------------------
    def setParams(self, **kwargs: Any) -> "SparkEstimator":
        for key, value in kwargs.items():
            if key not in self._params:
                raise TypeError(f"SparkEstimator has no parameter {key!r}; known: {sorted(self._params)}")
            if value is None:
                continue  # None keeps the default, as Cerebro's keyword_only constructor did
            if key == "batch_size":
                value = int(value)
                if value < 1:
                    raise ValueError(f"batch_size must be >= 1, got {value}")
            if key in ("metrics", "callbacks"):
                value = list(value)
            if key == "custom_objects":
                value = dict(value)
            self._params[key] = value
        return self

    def _get(self, key: str) -> Any:
        return self._params[key]

    def getModel(self): return self._get("model")  # noqa: E704 - one-line accessors, as in Cerebro
    def setModel(self, value): return self.setParams(model=value)  # noqa: E704
    def getOptimizer(self): return self._get("optimizer")  # noqa: E704
    def setOptimizer(self, value): return self.setParams(optimizer=value)  # noqa: E704
    def getLoss(self): return self._get("loss")  # noqa: E704
    def setLoss(self, value): return self.setParams(loss=value)  # noqa: E704
    def getLossWeights(self): return self._get("loss_weights")  # noqa: E704
    def setLossWeights(self, value): return self.setParams(loss_weights=value)  # noqa: E704
    def getMetrics(self): return self._get("metrics")  # noqa: E704
    def setMetrics(self, value): return self.setParams(metrics=value)  # noqa: E704
    def getBatchSize(self): return self._get("batch_size")  # noqa: E704
    def setBatchSize(self, value): return self.setParams(batch_size=value)  # noqa: E704
    def getCallbacks(self): return self._get("callbacks")  # noqa: E704
    def setCallbacks(self, value): return self.setParams(callbacks=value)  # noqa: E704
    def getTransformationFn(self): return self._get("transformation_fn")  # noqa: E704
    def setTransformationFn(self, value): return self.setParams(transformation_fn=value)  # noqa: E704
    def getCustomObjects(self): return self._get("custom_objects")  # noqa: E704
    def setCustomObjects(self, value): return self.setParams(custom_objects=value)  # noqa: E704
    def getFeatureCols(self): return self._get("feature_cols")  # noqa: E704
    def setFeatureCols(self, value): return self.setParams(feature_cols=list(value))  # noqa: E704
    def getLabelCols(self): return self._get("label_cols")  # noqa: E704
    def setLabelCols(self, value): return self.setParams(label_cols=list(value))  # noqa: E704
    def getStore(self): return self._get("store")  # noqa: E704
    def setStore(self, value): return self.setParams(store=value)  # noqa: E704
    def getHyperParams(self): return self._get("hyper_params")  # noqa: E704
    def setHyperParams(self, value): return self.setParams(hyper_params=dict(value))  # noqa: E704
    def getVerbose(self): return self._get("verbose")  # noqa: E704
    def setVerbose(self, value): return self.setParams(verbose=int(value))  # noqa: E704
    def getEpochs(self): return self._get("epochs")  # noqa: E704
    def setEpochs(self, value): return self.setParams(epochs=int(value))  # noqa: E704
    def getRunId(self): return self._get("run_id")  # noqa: E704
    def setRunId(self, value): return self.setParams(run_id=str(value))  # noqa: E704
    def getValidation(self): return self._get("validation")  # noqa: E704
    def setValidation(self, value): return self.setParams(validation=value)  # noqa: E704

    def fit(self, df: Any) -> Any:
        raise NotImplementedError("a SparkEstimator is trained by a model selection (GridSearch, RandomSearch, "
                                  "TPESearch), as in Cerebro; for one model use GridSearch with one configuration")

    # compiling -----------------------------------------------------------------------------------
    def compiled_model(self, input_shapes: Sequence[Sequence[int]] | None = None) -> Any:
        """The model compiled with this estimator's optimizer, loss, loss weights and metrics."""
        import keras

        model = self.getModel()
        if model is None:
            raise ValueError("SparkEstimator: model is required (a keras.Model)")
        if not isinstance(model, keras.Model):
            raise TypeError(f"SparkEstimator: model must be a Keras 3 keras.Model (tf.keras in TF >= 2.16), "
                            f"got {type(model).__module__}.{type(model).__name__}")
        loss = self.getLoss()
        if not loss:
            raise ValueError("SparkEstimator: loss is required for the model to compile")
        optimizer = self.getOptimizer() or getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("SparkEstimator: optimizer must be given, either as a parameter or as part of a "
                             "compiled model")
        if not model.built and input_shapes:
            # a Sequential model without an Input layer: build it from the data's row shapes
            model.build(input_shapes[0] if len(input_shapes) == 1 else list(input_shapes))
        model.compile(optimizer=optimizer, loss=loss, loss_weights=self.getLossWeights(),
                      metrics=self.getMetrics() or None)
        if model.built and not model.optimizer.built:
            # saved with its (zero) slots, the optimizer loads without Keras's "skipping variables" warning
            model.optimizer.build(model.trainable_variables)
        return model


# publishing to the workers -------------------------------------------------------------------------

def _tensor_info(t: Any) -> dict[str, Any]:
    shape = [None if d is None else int(d) for d in t.shape]
    return {"name": str(getattr(t, "name", "")), "shape": shape, "dtype": str(getattr(t, "dtype", "float32"))}


def publish_estimator(estimator: SparkEstimator, run_store: Store, model_id: str, *, params: Mapping[str, Any],
                      feature_columns: Sequence[str], label_columns: Sequence[str],
                      column_meta: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Compile the estimator's model and write its three files under ``models/<model_id>/``.

    Returns the model info (also written as ``model_info.json``). Errors name the mismatch between
    the model's inputs/outputs and the feature/label columns.
    """
    column_meta = column_meta or {}
    row_shapes = [[None, *column_meta[c]["shape"]] for c in feature_columns
                  if column_meta.get(c, {}).get("shape") is not None]
    model = estimator.compiled_model(row_shapes if len(row_shapes) == len(feature_columns) else None)
    try:
        inputs = [_tensor_info(t) for t in model.inputs]
        outputs = [_tensor_info(t) for t in model.outputs]
    except (AttributeError, ValueError) as e:
        raise ValueError(f"model {model_id}: cannot tell its inputs/outputs ({e}); start it with keras.Input(shape=...)")
    if len(inputs) != len(feature_columns):
        raise ValueError(f"model {model_id} has {len(inputs)} input(s) {[i['name'] for i in inputs]} but "
                         f"feature_columns has {len(feature_columns)} {list(feature_columns)}; each Keras input "
                         "takes one feature column")
    if len(outputs) != len(label_columns):
        raise ValueError(f"model {model_id} has {len(outputs)} output(s) but label_columns has {len(label_columns)} "
                         f"{list(label_columns)}; each Keras output is trained against one label column")
    for col, info in pair_inputs(feature_columns, inputs)[1]:
        meta = column_meta.get(col) or {}
        want, have = info["shape"][1:], meta.get("shape")
        if have is not None and None not in want and _size(want) != _size(have):
            raise ValueError(f"model {model_id}: input {info['name']!r} takes rows of shape {tuple(want)} but column "
                             f"{col!r} holds rows of shape {tuple(have)}")
    info = {"model_id": model_id, "params": dict(params), "feature_columns": list(feature_columns),
            "label_columns": list(label_columns), "batch_size": estimator.getBatchSize(), "inputs": inputs,
            "outputs": outputs, "custom_objects": sorted(estimator.getCustomObjects())}
    extras = {"batch_size": estimator.getBatchSize(), "transformation_fn": estimator.getTransformationFn(),
              "callbacks": estimator.getCallbacks(), "custom_objects": estimator.getCustomObjects(), "info": info}
    blob = dumps_user_objects(extras, what=f"model {model_id}'s callbacks / transformation_fn / custom objects")
    with tempfile.TemporaryDirectory(prefix="cerebro-init-") as d:
        local = os.path.join(d, INIT_NAME)
        model.save(local)
        run_store.put_file(local, MODELS_DIR, model_id, INIT_NAME)
    run_store.write_bytes(blob, MODELS_DIR, model_id, EXTRAS_NAME)
    run_store.write_json(info, MODELS_DIR, model_id, INFO_NAME)
    return info


def pair_inputs(columns: Sequence[str], inputs: list[dict[str, Any]]) -> tuple[bool, list[tuple[str, dict[str, Any]]]]:
    """Which feature column feeds which model input: by name when the input names are the feature
    columns (Cerebro matched Keras Input names to columns), else in order. Returns (by_name, pairs)
    with pairs in the model's input order."""
    names = [i["name"] for i in inputs]
    if len(inputs) > 1 and sorted(names) == sorted(columns):
        return True, [(i["name"], i) for i in inputs]
    return False, list(zip(columns, inputs))


def _size(shape: Sequence[Any]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def load_extras(run_store: Store, model_id: str) -> dict[str, Any]:
    """What :func:`publish_estimator` pickled for ``model_id`` (on a worker, or for ``transform``)."""
    try:
        return pickle.loads(run_store.read_bytes(MODELS_DIR, model_id, EXTRAS_NAME))
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"{run_store.url}/{MODELS_DIR}/{model_id}/{EXTRAS_NAME}: cannot load the estimator's "
                           f"callbacks / transformation_fn / custom objects here ({e}); define them in the driver "
                           "script or in a module installed on every worker") from e


# pickling user code ---------------------------------------------------------------------------------

def _library_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    dirs = {paths.get("stdlib"), paths.get("platstdlib"), paths.get("purelib"), paths.get("platlib")}
    return [os.path.realpath(d) for d in dirs if d]


def _is_user_module(name: str) -> bool:
    """A module the workers may not be able to import: not stdlib, site-packages or this project."""
    if name in ("__main__", "builtins") or name.split(".")[0] in ("cerebro_tasks", "keras", "tensorflow", "numpy"):
        return False
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if module is None or not path:
        return False
    real = os.path.realpath(path)
    return not any(real.startswith(d + os.sep) for d in _library_dirs())


def _user_modules(obj: Any, seen: set[int] | None = None, depth: int = 0) -> set[str]:
    """Modules of the user-defined functions and classes reachable from ``obj`` (shallow walk)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen or depth > 4:
        return set()
    seen.add(id(obj))
    found: set[str] = set()
    if isinstance(obj, Mapping):
        for v in obj.values():
            found |= _user_modules(v, seen, depth + 1)
        return found
    if isinstance(obj, (list, tuple, set)):
        for v in obj:
            found |= _user_modules(v, seen, depth + 1)
        return found
    names = [getattr(obj, "__module__", None)] if callable(obj) else []
    names.append(type(obj).__module__)
    for n in names:
        if n and _is_user_module(n):
            found.add(n)
    return found


def dumps_user_objects(obj: Any, what: str = "object") -> bytes:
    """cloudpickle ``obj``; functions/classes of modules the workers lack travel by value."""
    from pyspark import cloudpickle

    modules = [sys.modules[m] for m in _user_modules(obj)]
    for m in modules:
        cloudpickle.register_pickle_by_value(m)
    try:
        return cloudpickle.dumps(obj)
    except Exception as e:  # name what could not be shipped, not just the pickle error
        raise ValueError(f"cannot send {what} to the workers: {type(e).__name__}: {e}") from e
    finally:
        for m in modules:
            cloudpickle.unregister_pickle_by_value(m)
