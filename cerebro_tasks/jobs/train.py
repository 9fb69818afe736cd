"""The model-selection Spark job: the search's configurations trained with MOP, best model chosen.

Run by spark-submit (the Airflow training operator, through jobs/spark_entry.py), by
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
from cerebro_tasks.deeppostures import DeepPosturesWorkload
from cerebro_tasks.mop.runtime import run_mop
from cerebro_tasks.mop.timeline import plot_timeline
from cerebro_tasks.mop.worker import checkpoint_name
from cerebro_tasks.mop.workload import ModelSpec
from cerebro_tasks.store import Store
from cerebro_tasks.tune.report import markdown_table, plot_learning_curves, publish_png, summary_rows
from cerebro_tasks.tune.selection import best_model, final_value, metric_mode
from cerebro_tasks.tune.space import grid, parse_space, sample

log = logging.getLogger("cerebro_tasks.train")


def model_specs(config: TrainConfig) -> list[ModelSpec]:
    """The configurations to train, with stable ids and seeds (same config, same models)."""
    s = config.search
    space = parse_space(s.space)
    if s.kind == "grid":
        configs = grid(space)
    elif s.kind == "random":
        configs = sample(space, int(s.num_models or 0), np.random.default_rng(s.seed))
    else:
        raise ConfigError(f"search.kind: {s.kind!r} is not supported by the DeepPostures job")
    return [ModelSpec(model_id=f"m{i:03d}", params=c, num_epochs=s.num_epochs, seed=s.seed + i)
            for i, c in enumerate(configs)]


def class_weight_from_split(prepared: Store) -> tuple[tuple[int, float], ...]:
    """Balanced weights from the training label counts in split.json (1:1 when unknown)."""
    try:
        counts = prepared.read_json("split.json").get("train_label_counts", {})
    except (FileNotFoundError, OSError):
        counts = {}
    c0, c1 = float(counts.get("0", 0)), float(counts.get("1", 0))
    if c0 <= 0 or c1 <= 0:
        return ((0, 1.0), (1, 1.0))
    n = c0 + c1
    return ((0, n / (2 * c0)), (1, n / (2 * c1)))


def train(config: TrainConfig, spark: Any) -> dict[str, Any]:
    """Run the search; returns the small result (also written to result.json)."""
    config.validate()
    run = Store(config.run_url)
    run.write_json({"config": config_dict(config)}, "config.json")
    workload = DeepPosturesWorkload(config.prepared_url, batch_size=config.batch_size,
                                    class_weight=class_weight_from_split(Store(config.prepared_url)))
    specs = model_specs(config)
    log.info("run %s: %d models x %d epochs on %d workers, selecting on %s (%s)", config.run_id, len(specs),
             config.search.num_epochs, config.num_workers, config.search.metric, metric_mode(config.search.metric))
    started = time.time()
    result = run_mop(spark, workload, specs, config.run_url, num_workers=config.num_workers, seed=config.search.seed,
                     max_job_attempts=config.max_job_attempts)
    return finish(config, result, time.time() - started)


def finish(config: TrainConfig, result: Any, seconds: float) -> dict[str, Any]:
    """Choose the best model and write the run's summary, plots and result.json."""
    run = Store(config.run_url)
    metric = config.search.metric
    best = best_model(result.histories, metric)
    spec = result.specs[best]
    params = {m: s.params for m, s in result.specs.items()}
    per_model_s: dict[str, float] = {}
    for r in result.records:
        per_model_s[r["unit"]["model_id"]] = per_model_s.get(r["unit"]["model_id"], 0.0) + r["end"] - r["start"]
    rows = summary_rows(result.histories, params, metric, per_model_s)
    run.write_json({"metric": metric, "mode": metric_mode(metric), "models": rows, "figures": result.figures},
                   "summary.json")
    run.write_bytes((f"# Run {config.run_id}\n\nSelected on `{metric}` ({metric_mode(metric)}); best: **{best}**.\n\n"
                     + markdown_table(rows, metric)
                     + f"\nWall time {seconds:.1f} s; worker utilisation {result.figures.get('utilisation', 0):.2f}; "
                     f"hop overhead {result.figures.get('hop_overhead', 0):.3f}.\n").encode(), "summary.md")
    publish_png(run, "learning_curves.png", lambda p: plot_learning_curves(result.histories, p, title=config.run_id))
    if result.records:
        publish_png(run, "timeline.png", lambda p: plot_timeline(result.records, p, title=f"MOP timeline {config.run_id}"))
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
    run.write_json(out, "result.json")
    log.info("run %s done in %.1f s: best %s %s=%.4f %s", config.run_id, seconds, best, metric, out["best_value"],
             spec.params)
    return out


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
