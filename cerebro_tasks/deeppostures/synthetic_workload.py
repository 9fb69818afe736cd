"""The DeepPostures CNN-BiLSTM on generated sequences, for engine tests and benchmarks of hops.

The model, its compile and the inputs' shapes are the real workload's (deeppostures/workload.py);
only the data is generated in memory (seeded, with a learnable signal: a window is "sitting" when
its mean X acceleration is negative), so unit length is set by `sequences_per_partition` and no
prepared dataset is needed. The demo's units are about 640 sequences of 3 minutes at amp 0.25.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cerebro_tasks.deeppostures.architecture import AXES, SAMPLES_PER_WINDOW
from cerebro_tasks.deeppostures.sequences import window_size_for
from cerebro_tasks.deeppostures.workload import build_model, custom_objects, graph_key, model_params
from cerebro_tasks.mop.workload import ModelSpec, UnitInputs


@dataclass(frozen=True)
class SyntheticCnnBilstmWorkload:
    sequences_per_partition: int = 640
    batch_size: int = 16
    seed: int = 7

    def load_partition(self, kind: str, partition: int) -> dict[str, Any]:
        return {"by_window": {}, "partition": partition, "kind": kind}

    def _arrays(self, data: dict[str, Any], window_minutes: float) -> tuple[np.ndarray, np.ndarray]:
        t = window_size_for(window_minutes)
        if t not in data["by_window"]:
            rng = np.random.default_rng([self.seed, data["partition"], 0 if data["kind"] == "train" else 1, t])
            n = self.sequences_per_partition if data["kind"] == "train" else max(1, self.sequences_per_partition // 4)
            x = rng.normal(size=(n, t, SAMPLES_PER_WINDOW, AXES)).astype("float32")
            x[..., 0] += rng.normal(scale=0.3, size=(n, t, 1)).astype("float32")
            y = (x[..., 0].mean(axis=-1) < 0).astype("int32")
            data["by_window"][t] = (x, y)
        return data["by_window"][t]

    def build_model(self, spec: ModelSpec) -> Any:
        return build_model(spec.params, seed=spec.seed)

    def graph_key(self, spec: ModelSpec) -> str:
        return graph_key(spec.params)

    def inputs(self, data: dict[str, Any], spec: ModelSpec, *, training: bool, seed: int) -> UnitInputs:
        p = model_params(spec.params)
        x, y = self._arrays(data, p["window_minutes"])
        if training:
            order = np.random.default_rng(seed).permutation(len(y))
            x, y = x[order], y[order]
        return UnitInputs(x=x, y=y, num_samples=len(y), batch_size=int(p.get("batch_size", self.batch_size)))

    def custom_objects(self) -> dict[str, Any]:
        return custom_objects()
