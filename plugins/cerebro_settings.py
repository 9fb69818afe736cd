"""What unattended runs of `deeppostures_model_selection` search: a deployment setting.

Scheduled, Asset-triggered and backfill runs take the DAG's Param defaults; so does the trigger
form. Those defaults are read, when the DAG file is parsed, from the JSON file named by the
environment variable ``CEREBRO_RUN_DEFAULTS`` (an object of Param name -> value, any of
:data:`SETTABLE`); what it leaves out keeps the embedded default below, a search that finishes in
minutes on 2 cores. ``examples/run_defaults_published.json`` is the production example: the
published DeepPostures search (16 configurations, 10 epochs, batch 128).

A file named by an environment variable rather than an Airflow Variable because the Params are
fixed at parse time: a Variable read there is a metadata-database query on every parse of the
file (Airflow's guidance is to avoid it), while a file read is a local read that works the same
for the DAG processor, `airflow dags test` and the CLI, and can be versioned with the
deployment. The DAG processor re-parses the file periodically, so an edit reaches new runs within
minutes without touching code. A mistake (unreadable JSON, an unknown name) fails the parse with
an import error naming the file, shown in the UI, instead of silently running another search.
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV_VAR = "CEREBRO_RUN_DEFAULTS"

# About a minute of training on 2 cores for a few generated subject-days: 2 configurations x 3
# epochs of the smallest published architecture.
EMBEDDED: dict[str, Any] = {
    "search_kind": "grid",
    "search_space": {"learning_rate": [0.003, 0.0003], "amp_factor": [0.25], "l2": [0.0001], "window_minutes": [3]},
    "num_models": None,
    "num_epochs": 3,
    "num_workers": 2,
    "batch_size": 16,
    "metric": "val_loss",
    "seed": 2019,
    "retrain": "new_data",
}
SETTABLE = tuple(EMBEDDED)


def run_defaults(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The embedded defaults, overridden by the file ``$CEREBRO_RUN_DEFAULTS`` names (if set)."""
    path = (environ if environ is not None else os.environ).get(ENV_VAR, "").strip()
    if not path:
        return dict(EMBEDDED)
    try:
        with open(path) as f:
            given = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{ENV_VAR}={path}: expected a readable JSON file of run defaults: {e}") from None
    if not isinstance(given, dict):
        raise ValueError(f"{ENV_VAR}={path}: expected a JSON object of Param name -> value, "
                         f"got {type(given).__name__}")
    unknown = sorted(set(given) - set(SETTABLE))
    if unknown:
        raise ValueError(f"{ENV_VAR}={path}: unknown setting(s) {unknown}; expected some of {list(SETTABLE)}")
    return {**EMBEDDED, **given}
