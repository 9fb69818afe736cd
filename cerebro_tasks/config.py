"""The training run's configuration: typed, validated once, serialisable to JSON.

Airflow Params, the CLI and config files all end up here; an error names the field, what was
expected and what was given, before any Spark job starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from cerebro_tasks.errors import ConfigError
from cerebro_tasks.search.selection import MODES, SELECTS, metric_mode
from cerebro_tasks.search.space import grid, parse_space
from cerebro_tasks.search.stopping import check_early_stopping

SEARCH_KINDS = ("grid", "random", "tpe")
# what plugins/cerebro_operators.safe_run_id produces; no ':' (HDFS rejects it in path names)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class SearchConfig:
    space: dict[str, Any]
    kind: str = "grid"
    num_models: int | None = None  # random / tpe: how many configurations to train
    num_epochs: int = 10
    seed: int = 2019
    metric: str = "val_loss"
    # models in flight (default: grid and random all at once, tpe the number of workers)
    parallelism: int | None = None
    mode: str | None = None  # "min" | "max"; None: from the metric's Keras name (search/selection.py)
    select: str = "last_epoch"  # or "best_epoch": the best epoch's checkpoint is exported
    # e.g. {"kind": "asha", "reduction_factor": 3, "min_epochs": 1} (search/stopping/)
    early_stopping: dict[str, Any] | None = None

    def validate(self) -> None:
        _check(self.kind in SEARCH_KINDS, "search.kind", f"one of {SEARCH_KINDS}", self.kind)
        try:
            parse_space(self.space)
        except ValueError as e:
            raise ConfigError(f"search.space: {e}") from None
        _check(_is_int(self.num_epochs) and self.num_epochs >= 1, "search.num_epochs", "an integer >= 1",
               self.num_epochs)
        if self.kind != "grid":
            _check(_is_int(self.num_models) and self.num_models >= 1, "search.num_models",
                   f"an integer >= 1 for a {self.kind} search", self.num_models)
        _check(_is_int(self.seed), "search.seed", "an integer", self.seed)
        _check(self.parallelism is None or (_is_int(self.parallelism) and self.parallelism >= 1),
               "search.parallelism", "null or an integer >= 1", self.parallelism)
        if self.kind == "grid":
            try:
                grid(parse_space(self.space))
            except ValueError as e:
                raise ConfigError(f"search.space: {e}") from None
        _check(isinstance(self.metric, str) and self.metric.startswith(("val_", "train_")), "search.metric",
               "a history key such as val_loss or val_balanced_accuracy", self.metric)
        _check(self.mode is None or self.mode in MODES, "search.mode", f"null or one of {MODES}", self.mode)
        try:
            metric_mode(self.metric, self.mode)
        except ValueError as e:
            raise ConfigError(f"search.metric: {e} (search.mode)") from None
        _check(self.select in SELECTS, "search.select", f"one of {SELECTS}", self.select)
        try:
            check_early_stopping(self.early_stopping, self.num_epochs)
        except ValueError as e:
            raise ConfigError(f"search.early_stopping: {e}") from None

    @property
    def direction(self) -> str:
        """'min' or 'max': ``mode``, or the direction of the metric's Keras name."""
        return metric_mode(self.metric, self.mode)


@dataclass
class TrainConfig:
    prepared_url: str
    store_url: str
    run_id: str
    search: SearchConfig
    num_workers: int = 2
    batch_size: int = 16
    max_job_attempts: int = 3
    # "lockstep": same seed, same schedule (mop/lockstep.py); "adaptive": never waits, order follows timing
    schedule: str = "lockstep"
    # megabytes of built models each worker keeps warm across hops; None: derived from its memory
    model_cache_mb: float | None = None
    # "needed": delete checkpoints nothing reads any more (mop/runtime.py); "all": keep every one
    keep_checkpoints: str = "needed"

    @property
    def run_url(self) -> str:
        return f"{self.store_url.rstrip('/')}/runs/{self.run_id}"

    def validate(self) -> "TrainConfig":
        _check(bool(self.prepared_url), "prepared_url", "the prepared split's location", self.prepared_url)
        _check(bool(self.store_url), "store_url", "a folder or URL for runs", self.store_url)
        _check(isinstance(self.run_id, str) and bool(_SAFE_ID.match(self.run_id)), "run_id",
               "letters, digits and _.- (safe as a folder name on any filesystem)", self.run_id)
        _check(_is_int(self.num_workers) and self.num_workers >= 1, "num_workers", "an integer >= 1",
               self.num_workers)
        _check(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1",
               self.batch_size)
        _check(_is_int(self.max_job_attempts) and self.max_job_attempts >= 1, "max_job_attempts",
               "an integer >= 1", self.max_job_attempts)
        _check(self.schedule in ("lockstep", "adaptive"), "schedule", "'lockstep' or 'adaptive'", self.schedule)
        _check(self.model_cache_mb is None or isinstance(self.model_cache_mb, (int, float))
               and not isinstance(self.model_cache_mb, bool) and self.model_cache_mb >= 0, "model_cache_mb",
               "megabytes >= 0, or null for a default from the worker's memory", self.model_cache_mb)
        _check(self.keep_checkpoints in ("needed", "all"), "keep_checkpoints", "'needed' or 'all'",
               self.keep_checkpoints)
        self.search.validate()
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown configuration field(s) {sorted(unknown)}; expected some of {sorted(known)}")
        search = d.get("search")
        if not isinstance(search, dict):
            raise ConfigError(f"search: expected an object with at least 'space', got {search!r}")
        sknown = {f.name for f in fields(SearchConfig)}
        if set(search) - sknown:
            raise ConfigError(f"unknown search field(s) {sorted(set(search) - sknown)}; expected some of {sorted(sknown)}")
        if "space" not in search:
            raise ConfigError("search.space: missing (an object of parameter -> choices)")
        missing = [k for k in ("prepared_url", "store_url", "run_id") if k not in d]
        if missing:
            raise ConfigError(f"missing configuration field(s) {missing}")
        return cls(**{**d, "search": SearchConfig(**search)}).validate()

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"configuration is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _is_int(value: Any) -> bool:
    """An integer, and not a bool (JSON ``true`` is a Python int: ``num_epochs: true`` is 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {got!r}")
