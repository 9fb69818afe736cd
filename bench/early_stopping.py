"""Early stopping on MOP, side by side: the same DeepPostures search with and without it, same seed.

Two pairs on a small generated study (so the whole bench fits minutes on a laptop's CPUs):

* the grid of 16 (learning rate x L2 x amp factor, the published grid's shape at small sizes), all
  epochs vs ASHA (reduction factor 3, first rung after 1 epoch);
* a random search of 27 configurations, all epochs vs Hyperband (reduction factor 3).

For each search: total compute (unit-seconds: the sum of every train and val unit's duration), split
into one-off units (a graph's first trace on each worker, a model's first unit; at these small
sizes they are a large share) and the steady state, wall time,
the best validation loss reached, the best configuration, and whether the full search's best
configuration survived early stopping (was never stopped). Writes bench/results/early_stopping.json.

    python bench/early_stopping.py [--epochs 9] [--subjects 8] [--days 1] [--windows-per-day 360]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

from _common import RESULTS, ROOT, converted_study, write_results  # bench/ is this script's folder, first on sys.path

sys.path.insert(0, ROOT)

from cerebro_tasks.config import SearchConfig, TrainConfig  # noqa: E402
from cerebro_tasks.deeppostures.split import write_split  # noqa: E402
from cerebro_tasks.jobs.train import train  # noqa: E402
from cerebro_tasks.spark_session import get_spark  # noqa: E402
from cerebro_tasks.storage.store import Store  # noqa: E402

WORKERS = 2
GRID = {"learning_rate": [3e-3, 1e-3, 3e-4, 1e-4], "l2": [1e-3, 1e-5], "amp_factor": [0.25, 0.5],
        "window_minutes": [3]}
RANDOM = {"learning_rate": {"loguniform": [-4.5, -2]}, "l2": {"loguniform": [-5, -2]}, "amp_factor": [0.25, 0.5],
          "window_minutes": [3]}


def one(spark: Any, prepared: str, store: str, run_id: str, search: SearchConfig) -> dict[str, Any]:
    config = TrainConfig(prepared_url=prepared, store_url=store, run_id=run_id, search=search,
                         num_workers=WORKERS, batch_size=32)
    started = time.time()
    result = train(config, spark)
    wall = time.time() - started
    summary = Store(config.run_url).read_json("summary.json")
    records = Store(config.run_url).read_json("timeline.json")["records"]
    return {"run_id": run_id, "wall_s": round(wall, 1), "unit_seconds": round(result["unit_seconds"], 1),
            **compute_split(records), "units": len(records),
            "best_val_loss": round(result["best_value"], 5), "best_model_id": result["best_model_id"],
            "best_params": result["best_params"], "stopped_models": len(result["stopped_models"]),
            "models": result["models"], "utilisation": round(result["utilisation"], 3),
            "tail_utilisation": round(summary["figures"].get("tail_utilisation", float("nan")), 3),
            "stopped": result["stopped_models"]}


def compute_split(records: list[dict[str, Any]]) -> dict[str, float]:
    """Unit-seconds of one-off units, which early stopping cannot save: those that ran a train (or
    eval) function for the first time on their worker (Keras traces it then: once per graph and
    worker, mop/model_cache.py), and a model's first unit on a graph already traced there (it
    builds the model from its seed); and of the rest (the steady state, which grows with data
    and epochs)."""

    def one_off(r: dict[str, Any]) -> bool:
        return not r.get("traced") or r.get("arrival") == "new"

    first = sum(r["end"] - r["start"] for r in records if one_off(r))
    rest = sum(r["end"] - r["start"] for r in records if not one_off(r))
    return {"first_trace_unit_seconds": round(first, 1), "steady_unit_seconds": round(rest, 1)}


def pair(spark: Any, prepared: str, store: str, name: str, search: dict[str, Any], stopping: dict[str, Any]
         ) -> dict[str, Any]:
    full = one(spark, prepared, store, f"{name}-full", SearchConfig(**search))
    early = one(spark, prepared, store, f"{name}-{stopping['kind']}", SearchConfig(**search, early_stopping=stopping))
    return {"full": full, "early": early, "early_stopping": stopping,
            "compute_ratio": round(full["unit_seconds"] / early["unit_seconds"], 2),
            "steady_compute_ratio": round(full["steady_unit_seconds"] / early["steady_unit_seconds"], 2),
            "units_ratio": round(full["units"] / early["units"], 2),
            "wall_ratio": round(full["wall_s"] / early["wall_s"], 2),
            "best_val_loss_diff": round(early["best_val_loss"] - full["best_val_loss"], 5),
            "full_best_survived": full["best_model_id"] not in early["stopped"],
            "same_best": full["best_model_id"] == early["best_model_id"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--days", type=int, default=1)
    parser.add_argument("--windows-per-day", type=int, default=360)
    parser.add_argument("--random-models", type=int, default=27)
    parser.add_argument("--only", choices=["grid", "random"], default=None)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of the script: a grid of 2 and a random search of 3, 2 epochs (prints, writes nothing)")
    args = parser.parse_args()
    grid_space = GRID
    if args.quick:
        grid_space = {**GRID, "learning_rate": [3e-3, 1e-4], "l2": [1e-5], "amp_factor": [0.25]}
        args.epochs, args.random_models = 2, 3

    spark = get_spark("bench-early-stopping", master=f"local[{WORKERS}]")
    study = {"workers": WORKERS, "epochs": args.epochs, "subjects": args.subjects, "days": args.days,
             "windows_per_day": args.windows_per_day, "seed": 2019, "command": " ".join(sys.argv)}
    figures: dict[str, Any] = {}
    if args.only and os.path.exists(os.path.join(RESULTS, "early_stopping.json")):
        with open(os.path.join(RESULTS, "early_stopping.json")) as f:
            figures = json.load(f)  # the other pair stays as its own run left it (each pair names its study)
    with tempfile.TemporaryDirectory() as d:
        dataset = converted_study(d, subjects=args.subjects, days=args.days, windows_per_day=args.windows_per_day,
                                  spark=spark)
        prepared = f"{d}/prepared"
        write_split(dataset, prepared, workers=WORKERS, seed=2019, val_fraction=0.3, spark=spark)
        common = {"num_epochs": args.epochs, "seed": 2019, "metric": "val_loss"}
        if args.only in (None, "grid"):
            figures["grid16_asha"] = {**pair(spark, prepared, f"{d}/store", "grid16", {"space": grid_space, **common},
                                             {"kind": "asha", "reduction_factor": 3, "min_epochs": 1}), **study}
            if not args.quick:
                write_results("early_stopping", figures)  # a pair at a time: an interrupted bench keeps the first
        if args.only in (None, "random"):
            figures["random_hyperband"] = {**pair(
                spark, prepared, f"{d}/store", f"random{args.random_models}",
                {"space": RANDOM, "kind": "random", "num_models": args.random_models, **common},
                {"kind": "hyperband", "reduction_factor": 3, "min_epochs": 1}), **study}
    spark.stop()
    path = "not written (--quick)" if args.quick else write_results("early_stopping", figures)
    for key in ("grid16_asha", "random_hyperband"):
        if key not in figures:
            continue
        p = figures[key]
        print(f"{key}: compute {p['full']['unit_seconds']:.0f} -> {p['early']['unit_seconds']:.0f} unit-s "
              f"({p['compute_ratio']}x less; {p['steady_compute_ratio']}x less beside one-off first units "
              f"and traces, {p['full']['first_trace_unit_seconds']:.0f} -> {p['early']['first_trace_unit_seconds']:.0f} unit-s), wall {p['full']['wall_s']:.0f} -> {p['early']['wall_s']:.0f} s, best val_loss "
              f"{p['full']['best_val_loss']:.4f} -> {p['early']['best_val_loss']:.4f}, {p['early']['stopped_models']} of "
              f"{p['early']['models']} stopped, full search's best survived: {p['full_best_survived']}")
    print(f"figures in {path}")


if __name__ == "__main__":
    main()
