"""The model-selection Spark job: the search's configurations trained with MOP, best model chosen.

Run by spark-submit (the Airflow training operator, through spark_entry.py), by
`cerebro-tasks train`, or in-process via
`train(config, spark)`. Re-running with the same run id resumes from the run's journal.

Leaves in `<store>/runs/<run_id>/`: checkpoints, journal, history.json, timeline.json/png,
learning_curves.png, summary.json/md and result.json (the small metadata the DAG passes on).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from cerebro_tasks.config import ConfigError, TrainConfig
from cerebro_tasks.deeppostures.workload import DeepPosturesWorkload, check_search, relative_cost
from cerebro_tasks.mop.runtime import MopDriver, MopError
from cerebro_tasks.mop.timeline import plot_timeline
from cerebro_tasks.storage.layout import checkpoint_name
from cerebro_tasks.mop.workload import ModelSpec
from cerebro_tasks.storage.store import Store
from cerebro_tasks.search.report import plot_learning_curves, publish_png, summary_markdown, summary_rows
from cerebro_tasks.search.selection import best_model, final_value, metric_mode
from cerebro_tasks.search.tensorboard import write_tensorboard
from cerebro_tasks.search.space import grid, parse_space, sample
from cerebro_tasks.storage import layout

log = logging.getLogger("cerebro_tasks.train")


class SearchPlan:
    """Which models to train: all at once (grid, random) or as results come in (TPE).

    Model ids and seeds follow the order of proposal (`m000`, `m001`, ...), so the same
    configuration file gives the same models, and a resumed run continues the numbering.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.search = config.search
        self.space = parse_space(self.search.space)
        self.proposed = 0
        self.tpe = None
        if self.search.kind == "tpe":
            from cerebro_tasks.search.tpe import TPEProposer

            self.tpe = TPEProposer(self.space, seed=self.search.seed, metric_mode=metric_mode(self.search.metric))

    def _spec(self, params: dict[str, Any]) -> ModelSpec:
        spec = ModelSpec(model_id=f"m{self.proposed:03d}", params=params, num_epochs=self.search.num_epochs,
                         seed=self.search.seed + self.proposed, cost=relative_cost(params))
        self.proposed += 1
        return spec

    def initial(self, known: dict[str, ModelSpec]) -> list[ModelSpec]:
        """The first models; `known` are those of an earlier attempt of this run (resume)."""
        self.proposed = len(known)
        if self.search.kind == "grid":
            configs = grid(self.space)
        elif self.search.kind == "random":
            configs = sample(self.space, int(self.search.num_models or 0), np.random.default_rng(self.search.seed))
        else:
            # TPE keeps `parallelism` models in flight and proposes one more each time one finishes
            in_flight = self.search.parallelism or self.config.num_workers
            configs = [None] * min(in_flight, int(self.search.num_models or 0))
        fresh = configs[len(known):]
        if self.tpe is not None:
            fresh = self.tpe.propose(len(fresh)) if fresh else []
        return [self._spec(c) for c in fresh]

    def on_model_done(self, model_id: str, params: dict[str, Any], history: dict[str, list[float]],
                      in_flight: int) -> list[ModelSpec]:
        """Learn from a finished model; top the models in flight back up to `parallelism`."""
        if self.tpe is None:
            return []
        self.tpe.observe(params, final_value(history, self.search.metric))
        room = (self.search.parallelism or self.config.num_workers) - in_flight
        n = max(0, min(room, int(self.search.num_models or 0) - self.proposed))
        return [self._spec(p) for p in self.tpe.propose(n)] if n else []


def class_weights(spark: Any, prepared_url: str, num_workers: int) -> tuple[tuple[int, float], ...]:
    """Balanced weights n / (2 n_c) from the label counts of the windows training can use.

    A distributed count over three small Parquet columns of the training partitions: nothing but
    two numbers reaches the driver, whatever the size of the study.
    """
    from pyspark.sql import functions as F

    from cerebro_tasks.deeppostures.split import partition_url

    paths = [partition_url(prepared_url, "train", p) for p in range(num_workers)]
    df = spark.read.parquet(*paths).select("label", "sleeping", "non_wear")
    rows = (df.where((F.col("sleeping") == 0) & (F.col("non_wear") == 0) & (F.col("label") >= 0))
            .groupBy("label").count().collect())
    counts = {int(r["label"]): int(r["count"]) for r in rows}
    n = sum(counts.values())
    if len(counts) < 2:
        log.warning("training data holds labels %s only; class weights left at 1", sorted(counts))
        return ((0, 1.0), (1, 1.0))
    return tuple((label, n / (len(counts) * c)) for label, c in sorted(counts.items()))


def train(config: TrainConfig, spark: Any) -> dict[str, Any]:
    """Run the search; returns the small result (also written to result.json)."""
    config.validate()
    check_search(config.search.space, config.search.metric)
    check_split(config.prepared_url, config.num_workers)  # before config.json claims the run id
    run = Store(config.run_url)
    data = split_key(config.prepared_url)
    check_same_run(run, config, data)
    run.write_json({"config": config_dict(config), "data": data}, layout.CONFIG)
    weights = class_weights(spark, config.prepared_url, config.num_workers)
    log.info("class weights (sitting, not-sitting): %s", ", ".join(f"{w:.3f}" for _, w in weights))
    workload = DeepPosturesWorkload(config.prepared_url, batch_size=config.batch_size, class_weight=weights)
    driver = MopDriver(spark, workload, config.run_url, num_workers=config.num_workers, seed=config.search.seed,
                       max_job_attempts=config.max_job_attempts, schedule=config.schedule,
                       keep_checkpoints=config.keep_checkpoints,
                       select=(config.search.metric, metric_mode(config.search.metric)))
    driver.resume()
    plan = SearchPlan(config)
    for spec in plan.initial(driver.specs):
        driver.add(spec)
    log.info("run %s: %s search, %d models x %d epochs on %d workers, selecting on %s (%s)", config.run_id,
             config.search.kind, config.search.num_models or len(driver.specs), config.search.num_epochs,
             config.num_workers, config.search.metric, metric_mode(config.search.metric))

    done: set[str] = set()

    def on_model_done(model_id: str, history: dict[str, list[float]]) -> list[ModelSpec]:
        done.add(model_id)
        params = driver.specs[model_id].params
        try:
            write_tensorboard(config.run_url, model_id, params, history, config.search.metric)
        except Exception:  # logs are worth a warning, never the search
            log.exception("could not write the TensorBoard logs of %s", model_id)
        return plan.on_model_done(model_id, params, history, in_flight=len(driver.specs) - len(done))

    started = time.time()
    result = driver.run(on_model_done)
    return finish(config, result, time.time() - started)


def finish(config: TrainConfig, result: Any, seconds: float) -> dict[str, Any]:
    """Choose the best model and write the run's summary, plots and result.json."""
    run = Store(config.run_url)
    metric = config.search.metric
    usable = {m: h for m, h in result.histories.items() if m not in result.failed_models}
    if not usable:
        raise MopError(f"every model failed ({sorted(result.failed_models)}); the journal in {config.run_url} "
                       "and the driver log say why")
    best = best_model(usable, metric)  # a failed model has no final checkpoint, whatever its early metrics
    spec = result.specs[best]
    params = {m: s.params for m, s in result.specs.items()}
    per_model_s: dict[str, float] = {}
    for r in result.records:
        per_model_s[r["unit"]["model_id"]] = per_model_s.get(r["unit"]["model_id"], 0.0) + r["end"] - r["start"]
    rows = summary_rows(result.histories, params, metric, per_model_s)
    summary = {"search": config.search.kind, "run_id": config.run_id, "run_url": run.url_of(), "metric": metric,
               "mode": metric_mode(metric), "best_model_id": best, "num_models": len(result.specs),
               "num_epochs": config.search.num_epochs, "num_workers": config.num_workers, "seed": config.search.seed,
               "wall_s": seconds, "figures": result.figures, "failed_models": result.failed_models, "models": rows}
    run.write_json(summary, layout.SUMMARY_JSON)
    run.write_bytes(summary_markdown(summary).encode(), layout.SUMMARY_MD)
    publish_png(run, layout.LEARNING_CURVES_PNG, lambda p: plot_learning_curves(result.histories, p, title=config.run_id))
    if result.records:
        publish_png(run, layout.TIMELINE_PNG, lambda p: plot_timeline(result.records, p, title=f"MOP timeline {config.run_id}"))
    final_step = spec.num_epochs * config.num_workers
    out = {
        "run_id": config.run_id,
        "run_url": config.run_url,
        "metric": metric,
        "best_model_id": best,
        "best_params": spec.params,
        "best_value": final_value(result.histories[best], metric),
        "best_history": result.histories[best],
        "best_checkpoint": run.url_of(*checkpoint_name(best, final_step)),
        "models": len(result.specs),
        "failed_models": result.failed_models,
        "seconds": round(seconds, 2),
        "utilisation": result.figures.get("utilisation"),
        "hop_overhead": result.figures.get("hop_overhead"),
        "units_run": result.units_run,
    }
    run.write_json(out, layout.RESULT)
    log.info("run %s done in %.1f s: best %s %s=%.4f %s", config.run_id, seconds, best, metric, out["best_value"],
             spec.params)
    return out


def check_split(prepared_url: str, num_workers: int) -> None:
    """The prepared split exists and has one train and one val partition per worker, or a
    ConfigError in one line: checked before anything of the run is written."""
    from cerebro_tasks.deeppostures.split import SPLIT_FILE

    prepared = Store(prepared_url)
    if not prepared.exists(SPLIT_FILE):
        raise ConfigError(f"prepared_url {prepared_url}: no prepared split here ({SPLIT_FILE} missing); run "
                          "`cerebro-tasks split` first, or fix the path")
    workers = prepared.read_json(SPLIT_FILE).get("workers")
    if workers != num_workers:
        raise ConfigError(f"num_workers: the split at {prepared_url} has {workers} partitions per split, the run "
                          f"asks for {num_workers} workers; split again with --workers {num_workers}, or use "
                          f"num_workers={workers}")
    missing = [f"{kind}/part-{p}" for kind in ("train", "val") for p in range(num_workers)
               if not prepared.exists(kind, f"part-{p}")]
    if missing:
        raise ConfigError(f"prepared_url {prepared_url}: partition folder(s) {missing} missing; split again")


def split_key(prepared_url: str) -> dict[str, Any] | None:
    """What identifies the prepared data: the dataset version, seed and fractions of its split."""
    prepared = Store(prepared_url)
    return prepared.read_json("split.json").get("key") if prepared.exists("split.json") else None


def check_same_run(run: Store, config: TrainConfig, data: dict[str, Any] | None = None) -> None:
    """A retry may resume a run only with the configuration and data that started it.

    Checked before any Spark job: a resumed run on other partitions (the split re-run after new
    subjects arrived) would mix models trained on different data.
    """
    if not run.exists(layout.CONFIG):
        return
    saved = run.read_json(layout.CONFIG)
    before, now = saved["config"], config_dict(config)
    # neither the attempts allowed nor which checkpoints are kept changes what is trained
    changed = sorted(k for k in set(before) | set(now)
                     if k not in ("max_job_attempts", "keep_checkpoints") and before.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"{run.url_of('config.json')}: run {config.run_id!r} was started with other "
                          f"{', '.join(changed)}; resume it with the same configuration, or use a new run id")
    if saved.get("data") is not None and data is not None and saved["data"] != data:
        raise ConfigError(f"{run.url_of('config.json')}: run {config.run_id!r} was started on another split of the "
                          f"data ({saved['data']}, now {data}); resume it on the same split, or use a new run id")


def config_dict(config: TrainConfig) -> dict[str, Any]:
    import json

    return json.loads(config.to_json())


def load_config(text_or_path: str) -> TrainConfig:
    """A config given inline as JSON or as a path to a JSON file."""
    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
        with open(text_or_path) as f:
            text = f.read()
    return TrainConfig.from_json(text)
