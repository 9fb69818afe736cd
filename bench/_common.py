"""What the benchmarks share: a converted generated study, and where figures are written."""

from __future__ import annotations

import json
import os
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def converted_study(folder: str, *, subjects: int, days: int, windows_per_day: int, spark: Any) -> str:
    """Generate a study into `folder/h5` and convert it; returns the dataset path."""
    from cerebro_tasks.deeppostures.convert import convert
    from cerebro_tasks.deeppostures.synth import synthesize

    synthesize(f"{folder}/h5", subjects=subjects, days=days, seed=7, windows_per_day=windows_per_day)
    convert(f"{folder}/h5", f"{folder}/dataset", spark=spark)
    return f"{folder}/dataset"


def write_results(name: str, figures: dict[str, Any]) -> str:
    """bench/results/<name>.json; returns its path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)
    return path


def train_one_after_another(workload: Any, specs: list[Any], partitions: int) -> dict[str, Any]:
    """The MOP benches' baseline: each model alone in this process, visiting the partitions in order
    every epoch and validated after every epoch, as MOP validates it (the same train and val work,
    without hops or a second worker). Returns the seconds taken and each model's final val loss."""
    import keras

    data = {(k, p): workload.load_partition(k, p) for k in ("train", "val") for p in range(partitions)}
    for d in data.values():  # arrays a workload makes on first use: before the clock, as MOP's workers do
        workload.inputs(d, specs[0], training=False, seed=0)
    started = time.time()
    out = {}
    for spec in specs:
        keras.utils.set_random_seed(spec.seed)
        model = workload.build_model(spec)
        for epoch in range(spec.num_epochs):
            for p in range(partitions):
                i = workload.inputs(data["train", p], spec, training=True, seed=spec.seed * 100_003 + epoch * partitions + p)
                model.fit(i.x, i.y, batch_size=i.batch_size, epochs=1, shuffle=False, verbose=0)
            losses = []
            for p in range(partitions):
                i = workload.inputs(data["val", p], spec, training=False, seed=0)
                losses.append((model.evaluate(i.x, i.y, batch_size=i.batch_size, verbose=0, return_dict=True)["loss"],
                               i.num_samples))
        out[spec.model_id] = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    return {"seconds": time.time() - started, "final_val_loss": out}
