"""Cerebro's model selection API on MOP: the search driver, ``GridSearch``, ``RandomSearch`` and ``TPESearch``.

A search (``fit(df)`` or ``fit_on_prepared_data()``):

1. prepares the data (``fit`` only): ``backend.prepare_data`` -> ``<prefix>/train_data``, ``val_data``;
2. calls ``estimator_gen_fn(params)`` on the driver for each configuration, under the model's
   seed, and publishes the compiled model into ``<prefix>/runs/<run_id>/models/<model_id>/``;
3. trains every model for ``num_epochs`` with MOP (:class:`cerebro_tasks.mop.runtime.MopDriver`):
   ``num_workers`` long-lived Spark tasks, each owning a share of the data, models hopping between
   them, validation of epoch ``e`` beside training of ``e + 1``;
4. as each model finishes: writes its TensorBoard logs (hparams + per-epoch scalars), logs progress
   (models finished, epochs done, units per minute, best so far), and lets the search add models
   (TPE does; grid and random searches know theirs from the start);
5. at the end writes ``summary.json``, ``summary.md``, ``learning_curves.png`` and
   ``timeline.png`` into the run folder and returns a :class:`ModelSelectionResult`.

``run_id=`` (keyword) names the run folder; running again with the same id resumes it from its
journal (finished units are not redone).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cerebro_tasks.search.selection import best_model, final_value, metric_mode
from cerebro_tasks.search.space import Dimension, grid, parse_space, sample
from cerebro_tasks.search.tpe import TPEProposer
from cerebro_tasks.storage import layout

log = logging.getLogger("cerebro_tasks.search")

__all__ = ["ModelSelection", "GridSearch", "RandomSearch", "DEFAULT_SEED"]

DEFAULT_SEED = 2020  # Cerebro's constants.RANDOM_SEED
_TERMINAL = ("done", "stopped", "failed")
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
    """The base of Cerebro's searches: data preparation, MOP training, results, logs.

    Subclasses say which configurations to train: ``_initial_configs`` before training starts,
    ``_more_configs`` each time a model finishes.
    """

    search_kind = "search"

    def __init__(self, backend: Any, store: Any, estimator_gen_fn: Callable[[dict[str, Any]], Any],
                 search_space: Mapping[str, Any], num_epochs: int, evaluation_metric: str = "loss",
                 validation: float | str | None = 0.25, label_columns: Sequence[str] | None = None,
                 feature_columns: Sequence[str] | None = None, verbose: int = 1, *, seed: int = DEFAULT_SEED,
                 run_id: str | None = None) -> None:
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
        self.validation = validation
        self.label_cols = _columns(label_columns, "label", "label_columns")
        self.feature_cols = _columns(feature_columns, "features", "feature_columns")
        self.verbose = int(verbose)
        self.seed = int(seed)
        self._given_run_id = run_id
        self.run_id = run_id  # the run folder of the latest fit (a new one per fit unless run_id was given)
        # state of one fit
        self._driver: Any = None
        self._run_store: Any = None
        self._metadata: dict[str, Any] = {}
        self._metric_prefix = "val_"
        self._metric_key: str | None = None
        self._completed: set[str] = set()
        self._next_index = 0
        self._t0 = 0.0
        self._best: tuple[str, float] | None = None

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
    def _expected_models(self) -> int:
        raise NotImplementedError

    def _initial_configs(self, known: int, active: int) -> list[dict[str, Any]]:
        """Configurations to add before training; ``known`` models exist already (a resumed run)."""
        raise NotImplementedError

    def _more_configs(self, model_id: str, params: dict[str, Any], value: float, known: int,
                      in_flight: int) -> list[dict[str, Any]]:
        """Configurations to add now that ``model_id`` finished with ``value`` of the metric."""
        return []

    # the search --------------------------------------------------------------------------------------------
    def _fit_on_prepared_data(self, metadata: dict[str, Any], val_rows: int) -> Any:
        from cerebro_tasks.cerebro.workload import EstimatorWorkload

        _hide_driver_gpus()
        validate = val_rows > 0
        self._metric_prefix = "val_" if validate else "train_"
        if not validate:
            log.warning("no validation data: models are compared by train_%s", self.evaluation_metric)
        run_id = self._given_run_id or f"{self.search_kind}_{datetime.datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:6]}"
        self.run_id = run_id
        self._run_store = self.store.run_store(run_id)
        run_url = self._run_store.url
        workload = EstimatorWorkload(train_url=self.store.get_train_data_path(),
                                     val_url=self.store.get_val_data_path() if validate else None, run_url=run_url,
                                     feature_columns=tuple(self.feature_cols), label_columns=tuple(self.label_cols),
                                     num_workers=self.backend._num_workers())
        self._driver = driver = self.backend.mop_driver(workload, run_url, seed=_seed_of(self.seed, 2),
                                                        validate=validate)
        self._metadata = metadata
        self._completed = set()
        self._best = None
        self._metric_key = None
        driver.resume()
        known = len(driver.specs)
        self._next_index = known
        active = sum(1 for m in driver.specs if driver.scheduler.model_status(m).state not in _TERMINAL)
        if known:
            self._say(f"Resuming run {run_id}: {known} models known")
        for params in self._initial_configs(known, active):
            driver.add(self._new_model(params))
        if not driver.specs:
            raise ValueError(f"{type(self).__name__}: nothing to train (the search space gave no configurations)")
        self._run_store.write_json({"search": self.search_kind, "run_id": run_id, "seed": self.seed,
                                    "num_epochs": self.num_epochs, "evaluation_metric": self.evaluation_metric,
                                    "feature_columns": self.feature_cols, "label_columns": self.label_cols,
                                    "num_workers": self.backend._num_workers(),
                                    "search_space": {k: d.to_json() for k, d in self.space.items()}},
                                   "search.json")
        self._say(f"Launching Model Selection Workload: run {run_id}, {len(driver.specs)} models "
                  f"({self._expected_models()} planned), {self.backend._num_workers()} workers, in {run_url}")
        self._t0 = time.time()
        mop = driver.run(self._on_model_done)
        return self._finish(mop)

    def _new_model(self, params: Mapping[str, Any]) -> Any:
        """Build the estimator of one configuration on the driver and publish it for the workers."""
        import keras

        from cerebro_tasks.cerebro.estimator import SparkEstimator, publish_estimator
        from cerebro_tasks.mop.workload import ModelSpec

        index = self._next_index
        self._next_index += 1
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

    def _resolve_metric(self, history: Mapping[str, Any]) -> str | None:
        if self._metric_key is not None:
            return self._metric_key
        for name in _ALIASES.get(self.evaluation_metric, [self.evaluation_metric]):
            key = self._metric_prefix + name
            if key in history:
                self._metric_key = key
                return key
        return None

    def _on_model_done(self, model_id: str, history: dict[str, list[float]]) -> list[Any]:
        driver = self._driver
        spec = driver.specs[model_id]
        self._completed.add(model_id)
        state = driver.scheduler.model_status(model_id).state
        key = self._resolve_metric(history)
        value = final_value(history, key) if key else math.nan
        if key is None and state == "done":
            log.warning("model %s has no %s%s; it recorded %s", model_id, self._metric_prefix, self.evaluation_metric,
                        sorted(history))
        try:
            from cerebro_tasks.search.tensorboard import write_tensorboard

            write_tensorboard(self._run_store.url, model_id, spec.params, history, key)
        except Exception:  # logs are worth a warning, never the search
            log.exception("could not write TensorBoard logs of %s", model_id)
        if key and not math.isnan(value):
            better = self._best is None or (value > self._best[1] if metric_mode(key) == "max" else value < self._best[1])
            if better:
                self._best = (model_id, value)
        self._log_progress(model_id, state, key, value)
        known = len(driver.specs)
        in_flight = known - len(self._completed)
        return [self._new_model(p) for p in self._more_configs(model_id, dict(spec.params), value, known, in_flight)]

    def _log_progress(self, model_id: str, state: str, key: str | None, value: float) -> None:
        p = self._driver.scheduler.progress()
        W = self.backend._num_workers()
        epochs_done = sum(m["step"] // W for m in p["models"].values())
        epochs_total = max(self._expected_models(), len(p["models"])) * self.num_epochs
        minutes = max(time.time() - self._t0, 1e-9) / 60.0
        best = f"{self._best[0]} {key}={self._best[1]:.4g}" if self._best and key else "none yet"
        result = f"{key}={value:.4g}" if key and not math.isnan(value) else state
        self._say(f"{model_id} finished ({result}) | models {p['models_done']}/{max(self._expected_models(), p['models_total'])}, "
                  f"epochs {epochs_done}/{epochs_total}, {p['units_done'] / minutes:.1f} units/min, best so far: {best}")

    def _finish(self, mop: Any) -> Any:
        from cerebro_tasks.mop.timeline import plot_timeline
        from cerebro_tasks.storage.layout import checkpoint_name
        from cerebro_tasks.search.report import plot_learning_curves, publish_png, summary_markdown, summary_rows
        from cerebro_tasks.cerebro.result import ModelSelectionResult, SparkModel

        histories = mop.histories
        for model_id in mop.specs:
            histories.setdefault(model_id, {})
        key = self._metric_key
        if key is None or not any(key in h for h in histories.values()):
            seen = sorted({k for h in histories.values() for k in h})
            raise ValueError(f"evaluation_metric {self.evaluation_metric!r}: no model recorded "
                             f"{self._metric_prefix}{self.evaluation_metric}; metrics recorded: {seen} (compile the "
                             "model with this metric, or pick one of these)")
        params = {m: dict(s.params) for m, s in mop.specs.items()}
        usable = {m: h for m, h in histories.items() if m not in mop.failed_models}
        best_id = best_model(usable or histories, key)
        seconds: dict[str, float] = {}
        for r in mop.records:
            m = r["unit"]["model_id"]
            seconds[m] = seconds.get(m, 0.0) + r["end"] - r["start"]
        rows = summary_rows(histories, params, key, seconds)
        W = self.backend._num_workers()
        summary = {"search": self.search_kind, "run_id": self.run_id, "run_url": self._run_store.url_of(),
                   "metric": key, "mode": metric_mode(key), "best_model_id": best_id, "num_models": len(mop.specs),
                   "num_epochs": self.num_epochs, "num_workers": W, "seed": self.seed, "wall_s": mop.wall_s,
                   "figures": mop.figures, "failed_models": list(mop.failed_models), "models": rows}
        self._run_store.write_json(summary, layout.SUMMARY_JSON)
        self._run_store.write_bytes(summary_markdown(summary).encode(), layout.SUMMARY_MD)
        title = f"{self.search_kind} search {self.run_id}"
        publish_png(self._run_store, layout.LEARNING_CURVES_PNG, lambda p: plot_learning_curves(histories, p, title=title))
        if mop.records:
            publish_png(self._run_store, layout.TIMELINE_PNG, lambda p: plot_timeline(mop.records, p, title=title))
        fig = mop.figures
        self._say(f"Finished: best {best_id} {key}={final_value(histories[best_id], key):.4g}; "
                  f"{len(mop.specs)} models in {mop.wall_s:.1f} s, utilisation {fig.get('utilisation', 0):.0%}; "
                  f"summary in {self._run_store.url_of('summary.md')}")
        models = {}
        for model_id in sorted(mop.specs):
            step = self.num_epochs * W
            if model_id in mop.failed_models or not self._run_store.exists(*checkpoint_name(model_id, step)):
                continue
            info = self._run_store.read_json(*layout.model_file(model_id, layout.MODEL_INFO))
            models[model_id] = SparkModel(history=histories[model_id], feature_columns=self.feature_cols,
                                          label_columns=self.label_cols, run_id=model_id,
                                          run_url=self._run_store.url, checkpoint_step=step, info=info)
        if best_id not in models:
            raise RuntimeError(f"the best model {best_id} has no final checkpoint in {self._run_store.url}")
        return ModelSelectionResult(models[best_id], histories, list(models.values()),
                                    [f"{c}__output" for c in self.label_cols], run_url=self._run_store.url,
                                    summary=summary, mop_result=mop)

    def _say(self, message: str) -> None:
        """Progress: to the log, and printed Cerebro-style when logging is not set up (scripts)."""
        log.info("%s", message)
        if self.verbose >= 1 and not logging.getLogger().handlers and not logging.getLogger("cerebro_tasks").handlers:
            print(f"CEREBRO => Time: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}, {message}", flush=True)


class GridSearch(ModelSelection):
    """Cerebro's ``GridSearch``: every combination of the ``hp_choice`` values, trained with MOP.

    Arguments as Cerebro's: ``GridSearch(backend, store, estimator_gen_fn, search_space, num_epochs,
    evaluation_metric='loss', validation=0.25, label_columns=['label'], feature_columns=['features'],
    verbose=1)``; keyword-only ``seed`` (model weights, data split) and ``run_id`` (resume).
    """

    search_kind = "grid"

    def __init__(self, backend: Any, store: Any, estimator_gen_fn: Callable[[dict[str, Any]], Any],
                 search_space: Mapping[str, Any], num_epochs: int, evaluation_metric: str = "loss",
                 validation: float | str | None = 0.25, label_columns: Sequence[str] | None = None,
                 feature_columns: Sequence[str] | None = None, verbose: int = 1, *, seed: int = DEFAULT_SEED,
                 run_id: str | None = None) -> None:
        super().__init__(backend, store, estimator_gen_fn, search_space, num_epochs, evaluation_metric, validation,
                         label_columns, feature_columns, verbose, seed=seed, run_id=run_id)
        self.estimator_param_maps = grid(self.space)  # raises, naming the dimension, unless all are choices

    def _expected_models(self) -> int:
        return len(self.estimator_param_maps)

    def _initial_configs(self, known: int, active: int) -> list[dict[str, Any]]:
        return self.estimator_param_maps[known:]


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
                 run_id: str | None = None) -> None:
        super().__init__(backend, store, estimator_gen_fn, search_space, num_epochs, evaluation_metric, validation,
                         label_columns, feature_columns, verbose, seed=seed, run_id=run_id)
        if int(num_models) < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models!r}")
        self.num_models = int(num_models)
        self.num_params = self.num_models  # Cerebro's attribute name
        self.estimator_param_maps = sample(self.space, self.num_models, np.random.default_rng(_seed_of(self.seed, 5)))

    def _expected_models(self) -> int:
        return self.num_models

    def _initial_configs(self, known: int, active: int) -> list[dict[str, Any]]:
        return self.estimator_param_maps[known:]


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
        value after the last epoch); its direction follows its name (loss: lower, accuracy: higher).
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
    """

    search_kind = "tpe"

    def __init__(self, backend: Any, store: Any, estimator_gen_fn: Any, search_space: Mapping[str, Any],
                 num_models: int, num_epochs: int, evaluation_metric: str = "loss", validation: float | str = 0.25,
                 label_columns: list[str] | None = None, feature_columns: list[str] | None = None,
                 parallelism: int | None = None, verbose: int = 1, *, seed: int = 2020,
                 n_startup_jobs: int | None = None, run_id: str | None = None) -> None:
        super().__init__(backend, store, estimator_gen_fn, search_space, num_epochs,
                         evaluation_metric=evaluation_metric, validation=validation, label_columns=label_columns,
                         feature_columns=feature_columns, verbose=verbose, seed=seed, run_id=run_id)
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
        self.proposer: TPEProposer | None = None
        # (params, finished models TPE had seen when it proposed them): shows what each proposal learnt from
        self.proposals: list[tuple[dict[str, Any], int]] = []

    def _new_proposer(self) -> TPEProposer:
        from cerebro_tasks.search.selection import metric_mode

        # a generator of its own, derived from the search seed, so that it does not depend on
        # how many draws the data split or model seeds took
        return TPEProposer(self.space, seed=int(np.random.SeedSequence([self.seed, 7]).generate_state(1)[0]),
                           metric_mode=metric_mode(self.evaluation_metric), n_startup_jobs=self.n_startup_jobs)

    def _expected_models(self) -> int:
        return self.num_models

    def _initial_configs(self, known: int, active: int) -> list[dict[str, Any]]:
        self.proposer = self._new_proposer()  # one per fit; a resumed run's finished models are observed again
        self.proposals = []
        return self._propose(max(0, min(self.parallelism - active, self.num_models - known)))

    def _more_configs(self, model_id: str, params: dict[str, Any], value: float, known: int,
                      in_flight: int) -> list[dict[str, Any]]:
        assert self.proposer is not None
        self.proposer.observe(params, value)
        return self._propose(max(0, min(self.parallelism - in_flight, self.num_models - known)))

    def _propose(self, n: int) -> list[dict[str, Any]]:
        assert self.proposer is not None
        configs = self.proposer.propose(n)
        self.proposals.extend((c, self.proposer.num_observed) for c in configs)
        return configs


HyperOpt = TPESearch
