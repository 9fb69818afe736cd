"""What the benchmarks share: a converted generated study, and where figures are written."""

from __future__ import annotations

import json
import os
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
