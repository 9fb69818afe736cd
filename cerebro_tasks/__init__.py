"""cerebro_tasks: model selection with Model Hopper Parallelism (MOP) on Spark, orchestrated by Airflow.

Cerebro's public API is re-exported here, so a Cerebro script runs after changing only its imports::

    from cerebro_tasks import SparkBackend, SparkEstimator, LocalStore, HDFSStore
    from cerebro_tasks import GridSearch, RandomSearch, TPESearch, HyperOpt
    from cerebro_tasks import hp_choice, hp_uniform, hp_quniform, hp_loguniform, hp_qloguniform

The names are resolved on first use (module ``__getattr__``), so ``import cerebro_tasks`` loads
neither TensorFlow nor Spark: Airflow DAG files and the CLI stay fast to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "SparkBackend": "cerebro_tasks.cerebro.backend",
    "SparkEstimator": "cerebro_tasks.cerebro.estimator",
    "LocalStore": "cerebro_tasks.cerebro.stores",
    "HDFSStore": "cerebro_tasks.cerebro.stores",
    "hp_choice": "cerebro_tasks.search.space",
    "hp_uniform": "cerebro_tasks.search.space",
    "hp_quniform": "cerebro_tasks.search.space",
    "hp_loguniform": "cerebro_tasks.search.space",
    "hp_qloguniform": "cerebro_tasks.search.space",
    "GridSearch": "cerebro_tasks.cerebro.search",
    "RandomSearch": "cerebro_tasks.cerebro.search",
    "TPESearch": "cerebro_tasks.cerebro.search",
    "HyperOpt": "cerebro_tasks.cerebro.search",
    "TPEProposer": "cerebro_tasks.search.tpe",
    "ModelSelectionResult": "cerebro_tasks.cerebro.result",
    "SparkModel": "cerebro_tasks.cerebro.result",
    "write_tensorboard": "cerebro_tasks.search.tensorboard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cerebro_tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
