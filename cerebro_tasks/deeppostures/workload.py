"""The DeepPostures (CHAP) workload for the MOP engine: prepared partitions in, CNN-BiLSTMs out.

A worker reads its partition's windows once; the sequences for a window length T are built on
first use and cached, because every model with the same `window_minutes` shares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cerebro_tasks.deeppostures.sequences import build_training_sequences, sample_weights
from cerebro_tasks.mop.workload import ModelSpec, UnitInputs

# The published search (shared/reference/deeppostures.md): 16 configurations, 10 epochs, batch 128.
PUBLISHED_SPACE: dict[str, list[Any]] = {
    "learning_rate": [1e-3, 1e-4],
    "l2": [1e-3, 1e-4],
    "amp_factor": [2, 4],
    "window_minutes": [7, 9],
}
PUBLISHED_EPOCHS = 10
PUBLISHED_BATCH_SIZE = 128

PARAM_DEFAULTS: dict[str, Any] = {"learning_rate": 1e-4, "l2": 0.0, "amp_factor": 1, "window_minutes": 7}


# what every model of this workload reports (history keys are train_<name> and val_<name>)
METRICS = ("loss", "accuracy", "balanced_accuracy")


def check_search(space: dict[str, Any], metric: str) -> None:
    """Fail before any Spark job on a space or metric this workload cannot train or report.

    Every fixed choice is checked as the model builder will see it; for distributions, the range
    (for window_minutes, every value in it).
    """
    from cerebro_tasks.errors import ConfigError
    from cerebro_tasks.deeppostures.sequences import window_size_for
    from cerebro_tasks.search.space import parse_space

    if metric.split("_", 1)[-1] not in METRICS or not metric.startswith(("train_", "val_")):
        raise ConfigError(f"search.metric: expected train_ or val_ followed by one of {METRICS}, got {metric!r}")
    try:
        dims = parse_space(space)
        model_params({name: None for name in dims})  # names only: unknown hyperparameters
    except ValueError as e:
        raise ConfigError(f"search.space: {e}") from None
    positive = {"learning_rate": 0.0, "amp_factor": 0.0, "window_minutes": 0.0, "batch_size": 0.0}
    for name, dim in dims.items():
        values = list(dim.args[0]) if dim.kind == "choice" else []
        if dim.kind in ("uniform", "quniform"):
            values = [dim.args[0], dim.args[1]]
        for v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"search.space: {name!r} must be numbers, got {v!r}")
            if name in positive and v <= 0 or name == "l2" and v < 0:
                raise ConfigError(f"search.space: {name!r} must be {'>= 0' if name == 'l2' else '> 0'}, got {v!r}")
        if name == "window_minutes":
            # every value the search can propose must be a whole number of windows, not just the ends
            for v in _window_minutes_values(dim):
                try:
                    window_size_for(v)
                except ValueError as e:
                    raise ConfigError(f"search.space: window_minutes {v!r}: {e}") from None


def _window_minutes_values(dim: Any) -> list[float]:
    """Every value a window_minutes dimension can take; a continuous range is refused."""
    from cerebro_tasks.errors import ConfigError
    from cerebro_tasks.search.space import _quantise

    if dim.kind == "choice":
        return list(dim.args[0])
    if dim.kind in ("uniform", "loguniform"):
        raise ConfigError(f"search.space: window_minutes {dim.to_json()}: a continuous range proposes lengths that "
                          "are not whole 10-second windows; use a choice, or quniform with q a multiple of 1/6")
    low, high, q = dim.args
    if dim.kind == "qloguniform":
        low, high = 10.0 ** low, 10.0 ** high
    first, last = round(low / q), round(high / q)
    if last - first > 10_000:
        raise ConfigError(f"search.space: window_minutes {dim.to_json()}: more than 10000 values")
    return [_quantise(k * q, q) for k in range(first, last + 1)]


def model_params(params: dict[str, Any]) -> dict[str, Any]:
    """A configuration completed with the reference defaults (what the model is built from)."""
    unknown = set(params) - set(PARAM_DEFAULTS) - {"batch_size"}
    if unknown:
        raise ValueError(f"unknown DeepPostures hyperparameter(s) {sorted(unknown)}; "
                         f"expected some of {sorted(PARAM_DEFAULTS)} or batch_size")
    return {**PARAM_DEFAULTS, **params}


def graph_key(params: dict[str, Any]) -> str:
    """What shapes the compiled model: every parameter but the learning rate, which Adam keeps in a
    variable (so it travels with a model's state, mop/model_cache.py). L2 is in the loss's graph."""
    p = model_params(params)
    return ",".join(f"{k}={p[k]!r}" for k in sorted(p) if k != "learning_rate")


def build_model(params: dict[str, Any], seed: int | None = None, num_classes: int = 2) -> Any:
    from cerebro_tasks.deeppostures.model import build_cnn_bilstm, window_size_for

    p = model_params(params)
    return build_cnn_bilstm(window_size=window_size_for(p["window_minutes"]), amp_factor=float(p["amp_factor"]),
                            l2=float(p["l2"]), learning_rate=float(p["learning_rate"]), seed=seed,
                            num_classes=num_classes)


def study_classes(prepared_url: str) -> dict[str, int]:
    """The label map of the dataset a prepared split was made from (recorded at conversion)."""
    from cerebro_tasks.deeppostures.convert import dataset_study
    from cerebro_tasks.deeppostures.split import read_split

    return dataset_study(read_split(prepared_url)["dataset_url"])["label_map"]


def relative_cost(params: dict[str, Any]) -> float:
    """A configuration's training time per window, estimated without Keras: millions of parameters."""
    from cerebro_tasks.deeppostures.architecture import parameter_count

    return parameter_count(float(model_params(params)["amp_factor"])) / 1e6


def custom_objects() -> dict[str, Any]:
    from cerebro_tasks.deeppostures.model import CUSTOM_OBJECTS

    return dict(CUSTOM_OBJECTS)


@dataclass(frozen=True)
class DeepPosturesWorkload:
    """Reads `<prepared>/<kind>/part-<p>`; `class_weight` balances the classes (a class it does not
    name, e.g. one absent from training, weighs 1). `num_classes`: the model's outputs; by default
    the size of the study's label map, read once on the driver from the dataset's manifest."""

    prepared_url: str
    batch_size: int = 16
    class_weight: tuple[tuple[int, float], ...] = ((0, 1.0), (1, 1.0))
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.num_classes is None:  # frozen: set once, before the workload is shipped to workers
            object.__setattr__(self, "num_classes", len(study_classes(self.prepared_url)))

    def load_partition(self, kind: str, partition: int) -> dict[str, Any]:
        from cerebro_tasks.deeppostures.petastorm_io import read_windows
        from cerebro_tasks.deeppostures.split import partition_url

        table = read_windows(partition_url(self.prepared_url, kind, partition))
        return {"table": table, "sequences": {}}

    def build_model(self, spec: ModelSpec) -> Any:
        return build_model(spec.params, seed=spec.seed, num_classes=int(self.num_classes))

    def graph_key(self, spec: ModelSpec) -> str:
        return graph_key(spec.params)

    def inputs(self, data: dict[str, Any], spec: ModelSpec, *, training: bool, seed: int) -> UnitInputs:
        from cerebro_tasks.deeppostures.sequences import window_size_for

        p = model_params(spec.params)
        t = window_size_for(p["window_minutes"])
        if t not in data["sequences"]:
            x, y = build_training_sequences(data["table"], t)
            weights = {**{c: 1.0 for c in range(int(self.num_classes))}, **dict(self.class_weight)}
            data["sequences"][t] = (x, y, sample_weights(y, weights))
        x, y, w = data["sequences"][t]
        if training and len(y):
            # a fresh permuted copy per sub-epoch: cheap next to training on it
            order = np.random.default_rng(seed).permutation(len(y))
            x, y, w = x[order], y[order], w[order]
        return UnitInputs(x=x, y=y, sample_weight=w, num_samples=len(y),
                          batch_size=int(p.get("batch_size", self.batch_size)))

    def custom_objects(self) -> dict[str, Any]:
        return custom_objects()
