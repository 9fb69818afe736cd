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

from cerebro_tasks.config import TrainConfig
from cerebro_tasks.errors import ConfigError
from cerebro_tasks.deeppostures.workload import DeepPosturesWorkload, check_search, relative_cost
from cerebro_tasks.mop.runtime import MopDriver
from cerebro_tasks.mop.workload import ModelSpec
from cerebro_tasks.search.driver import SearchDriver, check_same_run
from cerebro_tasks.search.searcher import make_searcher
from cerebro_tasks.storage.layout import checkpoint_name
from cerebro_tasks.storage.store import Store
from cerebro_tasks.storage import layout

log = logging.getLogger("cerebro_tasks.train")


def model_spec(config: TrainConfig, index: int, params: dict[str, Any]) -> ModelSpec:
    """The DeepPostures model of the ``index``-th configuration: id ``m<index>``, seed ``seed + index``.

    Ids and seeds follow the order of proposal, so the same configuration file gives the same
    models, and a resumed run continues the numbering.
    """
    return ModelSpec(model_id=f"m{index:03d}", params=params, num_epochs=config.search.num_epochs,
                     seed=config.search.seed + index, cost=relative_cost(params))


def search_driver(config: TrainConfig, mop: Any) -> SearchDriver:
    """The one search driver, set up from the run configuration."""
    s = config.search
    searcher = make_searcher(s.kind, s.space, seed=s.seed, mode=s.direction, num_models=s.num_models)
    parallelism = s.parallelism or (config.num_workers if s.kind == "tpe" else None)
    return SearchDriver(mop, searcher, new_model=lambda i, p: model_spec(config, i, p), num_epochs=s.num_epochs,
                        metric_keys=[s.metric], mode=s.direction, select=s.select, early_stopping=s.early_stopping,
                        parallelism=parallelism)


def class_weights(spark: Any, prepared_url: str, num_workers: int) -> tuple[tuple[int, float], ...]:
    """Balanced weights n / (k n_c) from the label counts of the windows training can use.

    The split counted them as it wrote the partitions (split.json, ``usable_labels``); a split
    written before it did is counted now, distributed over three small Parquet columns of the
    training partitions: nothing but k numbers reaches the driver, whatever the size of the study.
    """
    counts = _recorded_label_counts(prepared_url, num_workers)
    if counts is None:
        counts = _count_labels(spark, prepared_url, num_workers)
    n = sum(counts.values())
    if len(counts) < 2:
        log.warning("training data holds labels %s only; class weights left at 1", sorted(counts))
        return ((0, 1.0), (1, 1.0))
    return tuple((label, n / (len(counts) * c)) for label, c in sorted(counts.items()))


def _recorded_label_counts(prepared_url: str, num_workers: int) -> dict[int, int] | None:
    from cerebro_tasks.deeppostures.split import SPLIT_FILE

    parts = Store(prepared_url).read_json(SPLIT_FILE).get("partitions", {}).get("train") or []
    if len(parts) != num_workers or any("usable_labels" not in p for p in parts):
        return None  # a split written before the counts were
    counts: dict[int, int] = {}
    for part in parts:
        for label, count in part["usable_labels"].items():
            if count:
                counts[int(label)] = counts.get(int(label), 0) + int(count)
    return counts


def _count_labels(spark: Any, prepared_url: str, num_workers: int) -> dict[int, int]:
    from pyspark.sql import functions as F

    from cerebro_tasks.deeppostures.split import partition_url

    paths = [partition_url(prepared_url, "train", p) for p in range(num_workers)]
    df = spark.read.parquet(*paths).select("label", "sleeping", "non_wear")
    rows = (df.where((F.col("sleeping") == 0) & (F.col("non_wear") == 0) & (F.col("label") >= 0))
            .groupBy("label").count().collect())
    return {int(r["label"]): int(r["count"]) for r in rows}


def train(config: TrainConfig, spark: Any) -> dict[str, Any]:
    """Run the search; returns the small result (also written to result.json)."""
    config.validate()
    check_search(config.search.space, config.search.metric)
    check_split(config.prepared_url, config.num_workers)  # before config.json claims the run id
    # neither the attempts allowed, nor which checkpoints are kept, nor the cache changes what is trained
    check_same_run(Store(config.run_url), config_dict(config), split_key(config.prepared_url),
                   ignore=("max_job_attempts", "keep_checkpoints", "model_cache_mb"))
    weights = class_weights(spark, config.prepared_url, config.num_workers)
    log.info("class weights (sitting, not-sitting): %s", ", ".join(f"{w:.3f}" for _, w in weights))
    workload = DeepPosturesWorkload(config.prepared_url, batch_size=config.batch_size, class_weight=weights)
    mop = MopDriver(spark, workload, config.run_url, num_workers=config.num_workers, seed=config.search.seed,
                    max_job_attempts=config.max_job_attempts, schedule=config.schedule,
                    model_cache_mb=config.model_cache_mb, keep_checkpoints=config.keep_checkpoints,
                    select=(config.search.metric, config.search.direction))
    search = search_driver(config, mop)
    search.start()
    log.info("run %s: %s search, %d models x %d epochs on %d workers, selecting on %s (%s, %s)%s", config.run_id,
             config.search.kind, search.searcher.total, config.search.num_epochs, config.num_workers,
             config.search.metric, config.search.direction, config.search.select,
             f", early stopping {config.search.early_stopping}" if config.search.early_stopping else "")
    started = time.time()
    result = search.run()
    return finish(config, search, result, time.time() - started)


def finish(config: TrainConfig, search: SearchDriver, result: Any, seconds: float) -> dict[str, Any]:
    """Choose the best model and epoch, write the run's summary and plots, and result.json."""
    run = Store(config.run_url)
    outcome = search.finish(result, search=config.search.kind, run_id=config.run_id, wall_s=seconds,
                            seed=config.search.seed)
    best = outcome.best_model_id
    out = {
        "run_id": config.run_id,
        "run_url": config.run_url,
        "metric": outcome.metric,
        "mode": search.mode,
        "select": outcome.select,
        "best_model_id": best,
        "best_params": result.specs[best].params,
        "best_epoch": outcome.best_epoch + 1,
        "best_value": outcome.best_value,
        "best_history": result.histories[best],
        "best_checkpoint": run.url_of(*checkpoint_name(best, outcome.best_step)),
        "models": len(result.specs),
        "failed_models": result.failed_models,
        "stopped_models": outcome.summary["stopped_models"],
        "seconds": round(seconds, 2),
        "utilisation": result.figures.get("utilisation"),
        "hop_overhead": result.figures.get("hop_overhead"),
        "unit_seconds": outcome.summary["figures"]["unit_seconds"],
        "hop_cost": result.figures.get("hop_cost"),
        "units_run": result.units_run,
    }
    run.write_json(out, layout.RESULT)
    log.info("run %s done in %.1f s: best %s %s=%.4f at epoch %d %s", config.run_id, seconds, best, outcome.metric,
             outcome.best_value, outcome.best_epoch + 1, result.specs[best].params)
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
