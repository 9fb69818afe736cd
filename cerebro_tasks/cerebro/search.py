"""Cerebro's model selection API on MOP: the search driver, ``GridSearch``, ``RandomSearch`` and ``TPESearch``.

A search (``fit(df)`` or ``fit_on_prepared_data()``):

1. prepares the data (``fit`` only): ``backend.prepare_data`` -> ``<prefix>/train_data``, ``val_data``;
2. calls ``estimator_gen_fn(params)`` on the driver for each configuration, under the model's
   seed, and publishes the compiled model into ``<prefix>/runs/<run_id>/models/<model_id>/``;
3. trains every model for ``num_epochs`` with MOP (:class:`cerebro_tasks.mop.runtime.MopDriver`):
   ``num_workers`` long-lived Spark tasks, each owning a share of the data, models hopping between
   them, validation of epoch ``e`` beside training of ``e + 1``; with ``early_stopping=`` a stopping
   rule judges each model after each epoch and stops the hopeless ones;
4. as each model finishes: writes its TensorBoard logs (hparams + per-epoch scalars), logs progress
   (models finished, epochs done, units per minute, best so far), and lets the search add models;
5. at the end writes ``summary.json``, ``summary.md``, ``learning_curves.png`` and
   ``timeline.png`` into the run folder and returns a :class:`ModelSelectionResult`.

Everything from 3 on is the one search driver (:class:`cerebro_tasks.search.driver.SearchDriver`)
that the DeepPostures job uses too; this module only adapts Cerebro's API to it.

``run_id=`` (keyword) names the run folder; running again with the same id resumes it from its
journal (finished units are not redone), after checking that the configuration and the prepared
data are those the run started with (``config.json``), as the DeepPostures job does.

Keywords beyond Cerebro's, on every search class: ``mode`` ("min"/"max"; default from the Keras
name of ``evaluation_metric``, and a name Keras does not know needs it), ``select``
("last_epoch", Cerebro's rule, or "best_epoch") and ``early_stopping`` (e.g. ``{"kind": "asha",
"reduction_factor": 3, "min_epochs": 1}``; see :mod:`cerebro_tasks.search.stopping`).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cerebro_tasks.search.searcher import GridSearcher, RandomSearcher, Searcher, TPESearcher
from cerebro_tasks.search.selection import SELECTS, metric_mode
from cerebro_tasks.search.space import Dimension, parse_space
from cerebro_tasks.search.stopping import check_early_stopping
from cerebro_tasks.storage import layout

log = logging.getLogger("cerebro_tasks.search")

__all__ = ["ModelSelection", "GridSearch", "RandomSearch", "DEFAULT_SEED"]

DEFAULT_SEED = 2020  # Cerebro's constants.RANDOM_SEED
_ALIASES = {"acc": ["acc", "accuracy"], "accuracy": ["accuracy", "acc"]}


def _size_in_millions(model: Any) -> float:
    """The lockstep clock's estimate of a model's training time: its parameter count (1 if unbuilt)."""
    try:
        return max(int(model.count_params()), 1) / 1e6
    except ValueError:  # a subclassed model not built yet has no weights to count
        return 1.0


def _seed_of(*keys: int) -> int:
    """A 31-bit seed derived from ``keys`` (independent streams for splits, models, samplers)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] & 0x7FFFFFFF)


def _json_safe(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    return value


class ModelSelection:
    """The base of Cerebro's searches: data preparation, the search driver, Cerebro's result.

    Subclasses say which searcher proposes the configurations (``_make_searcher``) and how many
    models are in flight (``_parallelism``).
    """

    search_kind = "search"

    def __init__(self, backend: Any, store: Any, estimator_gen_fn: Callable[[dict[str, Any]], Any],
                 search_space: Mapping[str, Any], num_epochs: int, evaluation_metric: str = "loss",
                 validation: float | str | None = 0.25, label_columns: Sequence[str] | None = None,
                 feature_columns: Sequence[str] | None = None, verbose: int = 1, *, seed: int = DEFAULT_SEED,
                 run_id: str | None = None, mode: str | None = None, select: str = "last_epoch",
                 early_stopping: Mapping[str, Any] | None = None) -> None:
        if not isinstance(search_space, Mapping):
            raise TypeError(f"search space has to be a dict of name -> hp_*(...); got {type(search_space).__name__}")
        bad = [k for k in search_space if not isinstance(k, str)]
        if bad:
            raise TypeError(f"search space keys must be strings (hyperparameter names); got {bad}")
        if not callable(estimator_gen_fn):
            raise TypeError("estimator_gen_fn must be a function params -> SparkEstimator")
        if int(num_epochs) < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs!r}")
        if not isinstance(evaluation_metric, str) or not evaluation_metric:
            raise ValueError(f"evaluation_metric must be a metric name such as 'loss' or 'acc', got {evaluation_metric!r}")
        self.backend = backend
        self.store = store
        self.estimator_gen_fn = estimator_gen_fn
        self.search_space = search_space
        self.space: dict[str, Dimension] = parse_space(dict(search_space))
        self.num_epochs = int(num_epochs)
        self.evaluation_metric = _strip_prefix(evaluation_metric)
        self.mode = metric_mode(self.evaluation_metric, mode)  # an unknown name without a mode: an error now
        if select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
        self.select = select
        self.early_stopping = check_early_stopping(early_stopping, self.num_epochs)
        self.validation = validation
        self.label_cols = _columns(label_columns, "label", "label_columns")
        self.feature_cols = _columns(feature_columns, "features", "feature_columns")
        self.verbose = int(verbose)
        self.seed = int(seed)
        self._given_run_id = run_id
        self.run_id = run_id  # the run folder of the latest fit (a new one per fit unless run_id was given)
        # state of one fit
        self.searcher: Searcher  # set by each search class once its arguments are checked
        self._search: Any = None  # the SearchDriver of the latest fit
        self._run_store: Any = None
        self._metadata: dict[str, Any] = {}
        self._metric_prefix = "val_"
        self._t0 = 0.0

    # Cerebro's entry points ----------------------------------------------------------------------------
    def fit(self, df: Any) -> Any:
        """Prepare ``df`` into the store, then select models on it. Returns a ModelSelectionResult."""
        self._say("Preparing Data")
        self.backend.prepare_data(self.store, df, self.validation, seed=_seed_of(self.seed, 1),
                                  feature_columns=self.feature_cols, label_columns=self.label_cols)
        return self.fit_on_prepared_data()

    def fit_on_prepared_data(self) -> Any:
        """Select models on the data already in the store (``train_path``/``val_path``)."""
        _, val_rows, metadata, _ = self.backend.get_metadata_from_parquet(self.store, self.label_cols,
                                                                          self.feature_cols)
        return self._fit_on_prepared_data(metadata, val_rows)

    # what subclasses decide ------------------------------------------------------------------------------
    def _make_searcher(self) -> Searcher:
        raise NotImplementedError

    def _parallelism(self) -> int | None:
        """Models in flight; None: every configuration at once."""
        return None

    def _expected_models(self) -> int:
        return self.searcher.total

    # the search --------------------------------------------------------------------------------------------
    def _fit_on_prepared_data(self, metadata: dict[str, Any], val_rows: int) -> Any:
        from cerebro_tasks.cerebro.data import data_files
        from cerebro_tasks.cerebro.workload import EstimatorWorkload
        from cerebro_tasks.search.driver import SearchDriver, check_same_run

        _hide_driver_gpus()
        validate = val_rows > 0
        self._metric_prefix = "val_" if validate else "train_"
        if not validate:
            log.warning("no validation data: models are compared by train_%s", self.evaluation_metric)
        run_id = self._given_run_id or f"{self.search_kind}_{datetime.datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:6]}"
        self.run_id = run_id
        self._run_store = self.store.run_store(run_id)
        run_url = self._run_store.url
        train_url, val_url = self.store.get_train_data_path(), self.store.get_val_data_path()
        W = self.backend._num_workers()
        # what a resumed run must find unchanged: the search, and the prepared data it trains on
        check_same_run(self._run_store, self._run_config(W), {
            "train_url": train_url, "val_url": val_url if validate else None, "val_rows": int(val_rows),
            "train_files": [f.rsplit("/", 1)[-1] for f in data_files(train_url)],
            "val_files": [f.rsplit("/", 1)[-1] for f in data_files(val_url)] if validate else [],
            "columns": {k: str(v) for k, v in sorted(metadata.items())}})
        workload = EstimatorWorkload(train_url=train_url, val_url=val_url if validate else None, run_url=run_url,
                                     feature_columns=tuple(self.feature_cols), label_columns=tuple(self.label_cols),
                                     num_workers=W)
        names = _ALIASES.get(self.evaluation_metric, [self.evaluation_metric])
        keys = [self._metric_prefix + n for n in names]
        mop = self.backend.mop_driver(workload, run_url, seed=_seed_of(self.seed, 2), validate=validate,
                                      select=(tuple(keys), self.mode))
        self._metadata = metadata
        self.searcher = self._make_searcher()  # one per fit; a resumed run's models are restored into it
        self._search = search = SearchDriver(
            mop, self.searcher, new_model=self._new_model, num_epochs=self.num_epochs,
            metric_keys=keys, mode=self.mode, select=self.select,
            early_stopping=self.early_stopping, parallelism=self._parallelism(), on_model_done=self._log_progress)
        known = search.start()
        if known:
            self._say(f"Resuming run {run_id}: {known} models known")
        self._say(f"Launching Model Selection Workload: run {run_id}, {len(mop.specs)} models "
                  f"({self._expected_models()} planned), {W} workers, in {run_url}")
        self._t0 = time.time()
        return self._finish(search.run())

    def _run_config(self, num_workers: int) -> dict[str, Any]:
        return {"search": self.search_kind, "seed": self.seed, "num_epochs": self.num_epochs,
                "num_models": self._expected_models(), "parallelism": self._parallelism(),
                "evaluation_metric": self.evaluation_metric, "mode": self.mode, "select": self.select,
                "early_stopping": self.early_stopping, "feature_columns": self.feature_cols,
                "label_columns": self.label_cols, "num_workers": num_workers,
                "search_space": {k: d.to_json() for k, d in self.space.items()}}

    def _new_model(self, index: int, params: Mapping[str, Any]) -> Any:
        """Build the estimator of the ``index``-th configuration on the driver and publish it for the workers."""
        import keras

        from cerebro_tasks.cerebro.estimator import SparkEstimator, publish_estimator
        from cerebro_tasks.mop.workload import ModelSpec

        width = max(3, len(str(max(self._expected_models(), index + 1) - 1)))
        model_id = f"model_{index:0{width}d}"
        params = {k: _json_safe(v) for k, v in params.items()}
        seed = _seed_of(self.seed, 3, index)
        keras.backend.clear_session()  # fresh layer names, no memory kept from the previous model
        keras.utils.set_random_seed(seed)  # the model's initial weights follow the search seed
        estimator = self.estimator_gen_fn(dict(params))
        if not isinstance(estimator, SparkEstimator):
            raise TypeError(f"estimator_gen_fn must return a cerebro_tasks SparkEstimator, got "
                            f"{type(estimator).__module__}.{type(estimator).__name__}")
        estimator.setHyperParams(params)
        estimator.setFeatureCols(self.feature_cols)
        estimator.setLabelCols(self.label_cols)
        estimator.setStore(self.store)
        estimator.setRunId(model_id)
        estimator.setVerbose(self.verbose)
        publish_estimator(estimator, self._run_store, model_id, params=params, feature_columns=self.feature_cols,
                          label_columns=self.label_cols, column_meta=self._metadata)
        self._say(f"Model: {model_id}, " + ", ".join(f"{k}: {v}" for k, v in params.items()))
        return ModelSpec(model_id, params, self.num_epochs, seed, cost=_size_in_millions(estimator.getModel()))

    def _log_progress(self, model_id: str, state: str, value: float) -> None:
        search = self._search
        p = search.mop.scheduler.progress()
        W = self.backend._num_workers()
        key = search.metric
        epochs_done = sum(m["step"] // W for m in p["models"].values())
        epochs_total = max(self._expected_models(), len(p["models"])) * self.num_epochs
        minutes = max(time.time() - self._t0, 1e-9) / 60.0
        best = f"{search.best_so_far[0]} {key}={search.best_so_far[1]:.4g}" if search.best_so_far and key else "none yet"
        result = f"{key}={value:.4g}" if key and not math.isnan(value) else state
        if state == "stopped":
            result += ", stopped early"
        self._say(f"{model_id} finished ({result}) | models {p['models_done']}/{max(self._expected_models(), p['models_total'])}, "
                  f"epochs {epochs_done}/{epochs_total}, {p['units_done'] / minutes:.1f} units/min, best so far: {best}")

    def _finish(self, mop: Any) -> Any:
        from cerebro_tasks.storage.layout import checkpoint_name
        from cerebro_tasks.cerebro.result import ModelSelectionResult, SparkModel

        search = self._search
        W = self.backend._num_workers()
        if search.metric is None:
            seen = sorted({k for h in mop.histories.values() for k in h})
            raise ValueError(f"evaluation_metric {self.evaluation_metric!r}: no model recorded "
                             f"{self._metric_prefix}{self.evaluation_metric}; metrics recorded: {seen} (compile the "
                             "model with this metric, or pick one of these)")
        outcome = search.finish(mop, search=self.search_kind, run_id=self.run_id, wall_s=mop.wall_s, seed=self.seed)
        histories = mop.histories
        fig = outcome.summary["figures"]
        self._say(f"Finished: best {outcome.best_model_id} {outcome.metric}={outcome.best_value:.4g} (epoch "
                  f"{outcome.best_epoch + 1}, {self.select}); {len(mop.specs)} models in {mop.wall_s:.1f} s, utilisation "
                  f"{fig.get('utilisation', 0):.0%}; summary in {self._run_store.url_of(layout.SUMMARY_MD)}")
        models = {}
        for model_id in sorted(mop.specs):
            epoch = outcome.selected_epochs.get(model_id)
            if epoch is None:
                continue  # failed, or no value of the metric
            step = (epoch + 1) * W  # the checkpoint of the epoch that counts for this model
            if not self._run_store.exists(*checkpoint_name(model_id, step)):
                continue
            info = self._run_store.read_json(*layout.model_file(model_id, layout.MODEL_INFO))
            models[model_id] = SparkModel(history=histories[model_id], feature_columns=self.feature_cols,
                                          label_columns=self.label_cols, run_id=model_id,
                                          run_url=self._run_store.url, checkpoint_step=step, info=info)
        best_id = outcome.best_model_id
        if best_id not in models:
            raise RuntimeError(f"the best model {best_id} has no checkpoint of epoch {outcome.best_epoch + 1} in "
                               f"{self._run_store.url}")
        return ModelSelectionResult(models[best_id], histories, list(models.values()),
                                    [f"{c}__output" for c in self.label_cols], run_url=self._run_store.url,
                                    summary=outcome.summary, mop_result=mop)

    def _say(self, message: str) -> None:
        """Progress: to the log, and printed Cerebro-style when logging is not set up (scripts)."""
        log.info("%s", message)
        if self.verbose >= 1 and not logging.getLogger().handlers and not logging.getLogger("cerebro_tasks").handlers:
            print(f"CEREBRO => Time: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}, {message}", flush=True)


class GridSearch(ModelSelection):
    """Cerebro's ``GridSearch``: every combination of the ``hp_choice`` values, trained with MOP.

    Arguments as Cerebro's: ``GridSearch(backend, store, estimator_gen_fn, search_space, num_epochs,
    evaluation_metric='loss', validation=0.25, label_columns=['label'], feature_columns=['features'],
    verbose=1)``; keyword-only ``seed`` (model weights, data split), ``run_id`` (resume), ``mode``,
    ``select`` and ``early_stopping`` (see the module docstring).
    """

    search_kind = "grid"

    def __init__(self, backend: Any, store: Any, estimator_gen_fn: Callable[[dict[str, Any]], Any],
                 search_space: Mapping[str, Any], num_epochs: int, evaluation_metric: str = "loss",
                 validation: float | str | None = 0.25, label_columns: Sequence[str] | None = None,
                 feature_columns: Sequence[str] | None = None, verbose: int = 1, *, seed: int = DEFAULT_SEED,
                 run_id: str | None = None, mode: str | None = None, select: str = "last_epoch",
                 early_stopping: Mapping[str, Any] | None = None) -> None:
        super().__init__(backend, store, estimator_gen_fn, search_space, num_epochs, evaluation_metric, validation,
                         label_columns, feature_columns, verbose, seed=seed, run_id=run_id, mode=mode, select=select,
                         early_stopping=early_stopping)
        self.searcher = self._make_searcher()  # raises, naming the dimension, unless all are choices
        self.estimator_param_maps = self.searcher.configs

    def _make_searcher(self) -> Searcher:
        return GridSearcher(self.space, seed=self.seed, mode=self.mode)


class RandomSearch(ModelSelection):
    """Cerebro's ``RandomSearch``: ``num_models`` configurations drawn from the space, trained with MOP.

    All draws come from one generator seeded by ``seed``, so two identical dimensions draw
    different values (Cerebro's helpers each restarted the same sequence).
    """

    search_kind = "random"

    def __init__(self, backend: Any, store: Any, estimator_gen_fn: Callable[[dict[str, Any]], Any],
                 search_space: Mapping[str, Any], num_models: int, num_epochs: int, evaluation_metric: str = "loss",
                 validation: float | str | None = 0.25, label_columns: Sequence[str] | None = None,
                 feature_columns: Sequence[str] | None = None, verbose: int = 1, *, seed: int = DEFAULT_SEED,
                 run_id: str | None = None, mode: str | None = None, select: str = "last_epoch",
                 early_stopping: Mapping[str, Any] | None = None) -> None:
        super().__init__(backend, store, estimator_gen_fn, search_space, num_epochs, evaluation_metric, validation,
                         label_columns, feature_columns, verbose, seed=seed, run_id=run_id, mode=mode, select=select,
                         early_stopping=early_stopping)
        if int(num_models) < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models!r}")
        self.num_models = int(num_models)
        self.num_params = self.num_models  # Cerebro's attribute name
        self.searcher = self._make_searcher()
        self.estimator_param_maps = self.searcher.configs

    def _make_searcher(self) -> Searcher:
        return RandomSearcher(self.space, seed=_seed_of(self.seed, 5), mode=self.mode, num_models=self.num_models)


# helpers -------------------------------------------------------------------------------------------------

def _strip_prefix(metric: str) -> str:
    for prefix in ("val_", "train_"):
        if metric.startswith(prefix):
            return metric[len(prefix):]
    return metric


def _columns(value: Sequence[str] | str | None, default: str, what: str) -> list[str]:
    if value is None:
        return [default]
    if isinstance(value, str):
        return [value]
    cols = list(value)
    if not cols or not all(isinstance(c, str) for c in cols):
        raise ValueError(f"{what} must be a non-empty list of column names, got {value!r}")
    return cols


def _hide_driver_gpus() -> None:
    """Keep the driver's TensorFlow (models built by estimator_gen_fn) off the GPUs the workers use."""
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # TensorFlow already initialised its devices, or is absent: leave it be
        pass


class TPESearch(ModelSelection):
    """Cerebro's ``TPESearch`` / ``HyperOpt``: TPE-guided model selection trained with MOP.

    :param backend: a :class:`~cerebro_tasks.cerebro.backend.SparkBackend`.
    :param store: a :class:`~cerebro_tasks.cerebro.stores.LocalStore` or :class:`~cerebro_tasks.cerebro.stores.HDFSStore`.
    :param estimator_gen_fn: ``params -> SparkEstimator``.
    :param search_space: ``{name: hp_*(...)}``.
    :param num_models: how many configurations to train in all.
    :param num_epochs: epochs per model.
    :param evaluation_metric: the metric TPE optimises and the best model is chosen by (validation
        value after the last epoch, or at the best epoch with ``select="best_epoch"``); its direction
        is ``mode``, by default that of its Keras name (loss: lower, accuracy: higher).
    :param validation: fraction of rows for validation (seeded split) or the name of a column.
    :param label_columns: label columns (default ``['label']``).
    :param feature_columns: feature columns (default ``['features']``).
    :param parallelism: models in flight at once (default: the backend's number of workers). With
        models of very different cost, ``2 * num_workers`` keeps the workers busier.
    :param verbose: 0 quiet, 1 progress, 2 more.
    :param seed: seeds the proposals, the data split and each model's initial weights.
    :param n_startup_jobs: finished models before TPE replaces random proposals (default 10, or
        half of ``num_models`` when that is smaller).
    :param run_id: name of the run folder ``<store>/runs/<run_id>``; an existing run is resumed.
    :param mode, select, early_stopping: see the module docstring.
    """

    search_kind = "tpe"

    def __init__(self, backend: Any, store: Any, estimator_gen_fn: Any, search_space: Mapping[str, Any],
                 num_models: int, num_epochs: int, evaluation_metric: str = "loss", validation: float | str = 0.25,
                 label_columns: list[str] | None = None, feature_columns: list[str] | None = None,
                 parallelism: int | None = None, verbose: int = 1, *, seed: int = 2020,
                 n_startup_jobs: int | None = None, run_id: str | None = None, mode: str | None = None,
                 select: str = "last_epoch", early_stopping: Mapping[str, Any] | None = None) -> None:
        super().__init__(backend, store, estimator_gen_fn, search_space, num_epochs,
                         evaluation_metric=evaluation_metric, validation=validation, label_columns=label_columns,
                         feature_columns=feature_columns, verbose=verbose, seed=seed, run_id=run_id, mode=mode,
                         select=select, early_stopping=early_stopping)
        if int(num_models) < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models!r}")
        self.num_models = int(num_models)
        self.num_params = self.num_models  # Cerebro's attribute name
        if parallelism is None:
            parallelism = backend._num_workers()
        if int(parallelism) < 1:
            raise ValueError(f"parallelism must be >= 1, got {parallelism!r}")
        self.parallelism = int(parallelism)
        if n_startup_jobs is None:
            n_startup_jobs = max(1, min(10, self.num_models // 2))
        self.n_startup_jobs = int(n_startup_jobs)
        self.searcher = self._make_searcher()

    def _make_searcher(self) -> Searcher:
        # a generator of its own, derived from the search seed, so that it does not depend on
        # how many draws the data split or model seeds took
        return TPESearcher(self.space, seed=int(np.random.SeedSequence([self.seed, 7]).generate_state(1)[0]),
                           mode=self.mode, num_models=self.num_models, n_startup_jobs=self.n_startup_jobs)

    def _parallelism(self) -> int | None:
        return self.parallelism

    @property
    def proposer(self) -> Any:
        """The TPE proposer of the latest fit (hyperopt's trials, observations)."""
        return self.searcher.proposer  # type: ignore[attr-defined]

    @property
    def proposals(self) -> list[tuple[dict[str, Any], int]]:
        """(params, finished models TPE had seen when it proposed them), in proposal order."""
        return self.searcher.proposals  # type: ignore[attr-defined]


HyperOpt = TPESearch
