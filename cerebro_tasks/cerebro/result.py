"""What a search returns: Cerebro's ``ModelSelectionResult`` and one ``SparkModel`` per trained model.

``SparkModel`` is a Spark ML ``Model`` (a Transformer): ``transform(df)`` appends one prediction
column per model output (``<label>__output`` unless ``setOutputCols`` says otherwise). Unlike
Cerebro's row-by-row ``transform``, it is a pandas UDF over Arrow batches: the Keras model is
loaded once per partition (from the run's final checkpoint, by URL, so nothing big travels in the
task closure) and predicts a few thousand rows per call.

Output columns: a model output of one value per row becomes a ``double`` column (the raw output,
e.g. a probability; Cerebro rounded it for integer labels), larger outputs an ``array<double>``
of the flattened values. Spark ML vector feature columns are accepted and converted on the fly.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping, Sequence, Tuple

import numpy as np
import pandas as pd
from pyspark.ml import Model

from cerebro_tasks.storage.store import Store

log = logging.getLogger("cerebro_tasks.search")

__all__ = ["SparkModel", "ModelSelectionResult", "PREDICT_CHUNK_ROWS"]

PREDICT_CHUNK_ROWS = 4096  # rows per Keras call: big enough to amortise the call, small enough for memory


class SparkModel(Model):
    """One trained model: its history, its Keras model, and ``transform`` for Spark DataFrames.

    Cerebro's accessors: ``getHistory()``, ``getModel()``/``keras()``, ``getRunId()``,
    ``getFeatureColumns()``, ``getLabelColumns()``, ``getOutputCols()``/``setOutputCols()``,
    ``getCustomObjects()``. Made by a search; also constructible from a Keras model directly
    (``SparkModel(model=m, feature_columns=[...], label_columns=[...])``).
    """

    def __init__(self, history: Mapping[str, list[float]] | None = None, model: Any = None,
                 feature_columns: Sequence[str] | None = None, label_columns: Sequence[str] | None = None,
                 custom_objects: Mapping[str, Any] | None = None, run_id: str | None = None, *,
                 run_url: str | None = None, checkpoint_step: int | None = None,
                 info: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if model is None and (run_url is None or checkpoint_step is None or run_id is None):
            raise ValueError("SparkModel needs a Keras model, or run_url + run_id + checkpoint_step of a search")
        self._history = dict(history or {})
        self._model = model
        self._feature_columns = list(feature_columns or ["features"])
        self._label_columns = list(label_columns or ["label"])
        self._custom_objects = dict(custom_objects) if custom_objects is not None else None
        self._run_id = run_id
        self._run_url = run_url
        self._checkpoint_step = checkpoint_step
        self._info = dict(info) if info is not None else None
        self._output_cols = [f"{c}__output" for c in self._label_columns]

    def __repr__(self) -> str:
        return f"SparkModel(run_id={self._run_id!r}, outputs={self._output_cols})"

    # Cerebro's accessors --------------------------------------------------------------------------------
    def getHistory(self) -> dict[str, list[float]]:
        return self._history

    def getRunId(self) -> str | None:
        return self._run_id

    def getFeatureColumns(self) -> list[str]:
        return list(self._feature_columns)

    def getLabelColumns(self) -> list[str]:
        return list(self._label_columns)

    def getOutputCols(self) -> list[str]:
        return list(self._output_cols)

    def setOutputCols(self, value: Sequence[str]) -> "SparkModel":
        cols = [value] if isinstance(value, str) else list(value)
        if len(cols) != len(self._label_columns):
            raise ValueError(f"{len(cols)} output column(s) {cols} for {len(self._label_columns)} label column(s) "
                             f"{self._label_columns}: give one output column per label (model output)")
        self._output_cols = cols
        return self

    def getCustomObjects(self) -> dict[str, Any]:
        if self._custom_objects is None:
            self._custom_objects = {}
            if self._run_url is not None:
                from cerebro_tasks.cerebro.estimator import load_extras

                self._custom_objects = dict(load_extras(Store(self._run_url), self._run_id).get("custom_objects") or {})
        return self._custom_objects

    def getModel(self) -> Any:
        return self.keras()

    def keras(self) -> Any:
        """The trained model as a plain Keras model (loaded from the final checkpoint on first use)."""
        if self._model is None:
            import keras

            from cerebro_tasks.storage.layout import checkpoint_name

            with Store(self._run_url).local_copy(*checkpoint_name(self._run_id, self._checkpoint_step)) as path:
                self._model = keras.saving.load_model(path, custom_objects=self.getCustomObjects() or None)
        return self._model

    def checkpoint_url(self) -> str | None:
        """Where the final checkpoint lives (None for a model given directly)."""
        if self._run_url is None:
            return None
        from cerebro_tasks.storage.layout import checkpoint_name

        return Store(self._run_url).url_of(*checkpoint_name(self._run_id, self._checkpoint_step))

    # transform ------------------------------------------------------------------------------------------
    def _io_info(self) -> dict[str, Any]:
        if self._info is not None:
            return self._info
        model = self.keras()
        self._info = {"inputs": [_tensor_info(t) for t in model.inputs],
                      "outputs": [_tensor_info(t) for t in model.outputs]}
        return self._info

    def _transform(self, dataset: Any) -> Any:
        from pyspark.ml.functions import vector_to_array
        from pyspark.ml.linalg import VectorUDT
        from pyspark.sql import functions as F
        from pyspark.sql import types as T

        info = self._io_info()
        inputs, outputs = info["inputs"], info["outputs"]
        if len(self._output_cols) != len(outputs):
            raise ValueError(f"the model has {len(outputs)} output(s) but {len(self._output_cols)} output column(s) "
                             f"{self._output_cols} are set")
        missing = [c for c in self._feature_columns if c not in dataset.columns]
        if missing:
            raise ValueError(f"transform: feature column(s) {missing} not in the DataFrame; columns: {dataset.columns}")
        clash = [c for c in self._output_cols if c in dataset.columns]
        if clash:
            raise ValueError(f"transform: output column(s) {clash} already exist; choose others with set_output_columns")
        types = {f.name: f.dataType for f in dataset.schema.fields}
        args = [vector_to_array(F.col(c), "float32") if isinstance(types[c], VectorUDT) else F.col(c)
                for c in self._feature_columns]
        sizes = [_size(o["shape"][1:]) for o in outputs]
        out_types = [T.DoubleType() if s == 1 else T.ArrayType(T.DoubleType()) for s in sizes]
        source = self._model_source()
        if len(outputs) == 1:
            fn = _predict_udf(source, inputs, self._feature_columns, sizes, None)
            udf = F.pandas_udf(fn, out_types[0])
            return dataset.withColumn(self._output_cols[0], udf(*args))
        names = [f"o{i}" for i in range(len(outputs))]
        struct = T.StructType([T.StructField(n, t) for n, t in zip(names, out_types)])
        fn = _predict_udf(source, inputs, self._feature_columns, sizes, names)
        # non-deterministic: stops Spark from running the UDF once per field it extracts
        udf = F.pandas_udf(fn, struct).asNondeterministic()
        tmp = "__cerebro_predictions"
        out = dataset.withColumn(tmp, udf(*args))
        return out.select(*[F.col(c) for c in dataset.columns],
                          *[F.col(f"{tmp}.{n}").alias(o) for n, o in zip(names, self._output_cols)])

    def _model_source(self) -> dict[str, Any]:
        """How a task gets the model: the checkpoint URL of a search, or the model's bytes."""
        if self._run_url is not None:
            from cerebro_tasks.storage.layout import checkpoint_name

            return {"run_url": self._run_url, "parts": list(checkpoint_name(self._run_id, self._checkpoint_step)),
                    "model_id": self._run_id}
        import tempfile

        from cerebro_tasks.cerebro.estimator import dumps_user_objects

        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/model.keras"
            self._model.save(path)
            with open(path, "rb") as f:
                blob = f.read()
        return {"bytes": blob, "custom_objects": dumps_user_objects(self._custom_objects or {}, "custom objects")}


def _tensor_info(t: Any) -> dict[str, Any]:
    return {"name": str(getattr(t, "name", "")), "shape": [None if d is None else int(d) for d in t.shape],
            "dtype": str(getattr(t, "dtype", "float32"))}


def _size(shape: Sequence[Any]) -> int:
    n = 1
    for d in shape:
        n *= int(d) if d is not None else 1
    return n


def _load_for_prediction(source: Mapping[str, Any]) -> Any:
    """On a task: configure TensorFlow for a Spark task slot, then load the model once."""
    import os
    import pickle
    import tempfile

    from cerebro_tasks.mop.worker import configure_devices

    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        cpus = ctx.cpus() if ctx is not None else 1
    except Exception:
        cpus = 1
    configure_devices([], cpus)  # prediction runs on the task's CPU cores, as Cerebro's did
    import keras

    if "bytes" in source:
        custom = pickle.loads(source["custom_objects"]) or None
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.keras")
            with open(path, "wb") as f:
                f.write(source["bytes"])
            return keras.saving.load_model(path, custom_objects=custom)
    from cerebro_tasks.cerebro.estimator import load_extras

    store = Store(source["run_url"])
    custom = load_extras(store, source["model_id"]).get("custom_objects") or None
    with store.local_copy(*source["parts"]) as path:
        return keras.saving.load_model(path, custom_objects=custom)


def _as_batch(series: pd.Series, info: Mapping[str, Any]) -> np.ndarray:
    """One pandas column of a batch as the model input: arrays stacked, cast, reshaped."""
    values = series.to_numpy()
    if values.dtype == object:
        values = np.stack([np.asarray(v) for v in values]) if len(values) else np.zeros((0,))
    dtype = str(info.get("dtype", "float32"))
    if values.dtype.kind in "fiub" and dtype.startswith(("float", "int")):
        values = values.astype(dtype, copy=False)
    target = info["shape"][1:]
    if None not in target and list(values.shape[1:]) != target and _size(values.shape[1:]) == _size(target):
        values = values.reshape((len(values), *target))
    return values


def _predict_udf(source: Mapping[str, Any], inputs: list[dict[str, Any]], columns: Sequence[str],
                 sizes: list[int], names: list[str] | None):
    """The function of the pandas UDF: batches of feature columns in, predictions out."""
    from cerebro_tasks.cerebro.estimator import pair_inputs

    names_in = [i["name"] for i in inputs]
    by_name, pairs = pair_inputs(columns, inputs)
    order = [list(columns).index(col) for col, _ in pairs]  # batch column feeding each model input

    def predict(batches: Iterator[Tuple[pd.Series, ...]]) -> Iterator[pd.Series]:
        model = _load_for_prediction(source)
        for cols in batches:
            if isinstance(cols, pd.Series):
                cols = (cols,)
            xs = [_as_batch(cols[j], info) for j, info in zip(order, inputs)]
            n = len(xs[0])
            chunks: list[list[np.ndarray]] = []
            for start in range(0, n, PREDICT_CHUNK_ROWS):
                part = [x[start:start + PREDICT_CHUNK_ROWS] for x in xs]
                feed: Any = part[0] if len(part) == 1 else (
                    {name: x for name, x in zip(names_in, part)} if by_name else part)
                pred = model.predict_on_batch(feed)
                pred = list(pred) if isinstance(pred, (list, tuple)) else [pred]
                chunks.append([np.asarray(p) for p in pred])
            per_output = [np.concatenate([c[i] for c in chunks]) if chunks else np.zeros((0, s))
                          for i, s in enumerate(sizes)]
            cols_out = []
            for p, s in zip(per_output, sizes):
                flat = p.reshape((n, -1)).astype("float64")
                cols_out.append(pd.Series(flat[:, 0]) if s == 1 else pd.Series(list(flat)))
            if names is None:
                yield cols_out[0]
            else:
                yield pd.DataFrame({name: c for name, c in zip(names, cols_out)})

    return predict


class ModelSelectionResult:
    """Output of ``fit(df)`` / ``fit_on_prepared_data()``: the best model, every model, their histories.

    Beyond Cerebro's methods: ``best_model_id``, ``run_url`` (the run folder), ``summary`` (what
    ``summary.json`` holds, models best first) and ``figures`` (MOP utilisation, hop overhead,
    makespan).
    """

    def __init__(self, best_model: SparkModel, metrics: Mapping[str, dict[str, list[float]]],
                 all_models: Sequence[SparkModel], output_columns: Sequence[str], *, run_url: str | None = None,
                 summary: Mapping[str, Any] | None = None, mop_result: Any = None) -> None:
        self.best_model = best_model
        self.metrics = dict(metrics)
        self.all_models = list(all_models)
        self.output_columns = list(output_columns)
        self.run_url = run_url
        self.summary = dict(summary or {})
        self.mop_result = mop_result
        self.set_output_columns(self.output_columns)

    def __repr__(self) -> str:
        return f"ModelSelectionResult(best={self.best_model_id!r}, models={len(self.all_models)}, run={self.run_url!r})"

    @property
    def best_model_id(self) -> str | None:
        return self.best_model.getRunId()

    @property
    def figures(self) -> dict[str, Any]:
        return dict(self.summary.get("figures") or {})

    def set_output_columns(self, output_columns: Sequence[str]) -> "ModelSelectionResult":
        """Names of the prediction columns ``transform`` appends (one per label column)."""
        cols = [output_columns] if isinstance(output_columns, str) else list(output_columns)
        self.best_model.setOutputCols(cols)
        for m in self.all_models:
            m.setOutputCols(cols)
        self.output_columns = cols
        return self

    def keras(self) -> Any:
        """The best model as a plain Keras model."""
        return self.best_model.keras()

    def transform(self, dataset: Any) -> Any:
        """Predict with the best model: ``dataset`` plus the output columns."""
        return self.best_model.transform(dataset)

    def get_best_model(self) -> SparkModel:
        return self.best_model

    def get_history(self) -> dict[str, list[float]]:
        """The best model's per-epoch ``train_*`` / ``val_*`` metrics."""
        return self.get_best_model_history()

    def get_best_model_history(self) -> dict[str, list[float]]:
        return self.best_model.getHistory()

    def get_all_models(self) -> list[SparkModel]:
        return list(self.all_models)

    def get_all_model_history(self) -> dict[str, dict[str, list[float]]]:
        """Model id -> history, for every model of the search (failed ones with what they reached)."""
        return dict(self.metrics)

    def get_metrics(self) -> dict[str, dict[str, list[float]]]:
        """Cerebro 1.0's name for :meth:`get_all_model_history`."""
        return self.get_all_model_history()
