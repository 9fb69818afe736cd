"""What the MOP engine needs to know about a workload: how to read a partition and build a model.

The engine itself knows nothing of DeepPostures or of Cerebro's estimator API; both provide a
`Workload`. A workload is pickled once into the Spark job and unpickled on every worker, so it
holds only small, picklable things (URLs, parameters, functions), never data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ModelSpec:
    """One candidate of the search: an id, its hyperparameters and its own seed."""

    model_id: str
    params: dict[str, Any]
    num_epochs: int
    seed: int = 0
    # Estimated training time per unit, any scale (> 0): the lockstep schedule's clock
    # (mop/lockstep.py). Deterministic and cheap: e.g. the parameter count in millions.
    cost: float = 1.0


@dataclass
class UnitInputs:
    """What `Workload.inputs` hands to Keras: arrays or a tf.data.Dataset, and the sample count."""

    x: Any
    y: Any = None
    sample_weight: Any = None
    num_samples: int = 0
    batch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Workload(Protocol):
    """The one interface between the MOP engine and a training problem.

    Optionally, ``graph_key(spec) -> str`` names the model's graph: specs with the same key build
    models with the same variables and the same compiled functions, differing only in values their
    state carries (weights, optimizer slots, a learning rate held in a variable). A worker then
    keeps one built, traced model per graph and reads each model's state into it
    (mop/model_cache.py). Without it every model is a graph of its own.
    """

    def load_partition(self, kind: str, partition: int) -> Any:
        """Read partition `partition` of `kind` ("train" or "val") once; the worker caches it."""

    def build_model(self, spec: ModelSpec) -> Any:
        """A compiled Keras model with fresh weights for `spec` (the engine seeds before calling)."""

    def inputs(self, data: Any, spec: ModelSpec, *, training: bool, seed: int) -> UnitInputs:
        """Model inputs for one unit over a loaded partition; `seed` orders the shuffle."""

    def custom_objects(self) -> dict[str, Any]:
        """Objects Keras needs to load a checkpoint of this workload's models."""
