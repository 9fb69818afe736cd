"""A small, real Keras workload with generated data, for engine tests and benchmarks.

Each partition holds a seeded, linearly separable-ish classification problem drawn from one shared
ground truth, so models really learn (loss falls) and the engine can be measured with units whose
length is set by `rows_per_partition` and `hidden`, without any dataset on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cerebro_tasks.mop.workload import ModelSpec, UnitInputs


@dataclass(frozen=True)
class SyntheticWorkload:
    rows_per_partition: int = 2048
    features: int = 32
    seed: int = 7
    batch_size: int = 64

    def load_partition(self, kind: str, partition: int) -> dict[str, np.ndarray]:
        truth = np.random.default_rng(self.seed).normal(size=(self.features,))
        rng = np.random.default_rng([self.seed, partition, 0 if kind == "train" else 1])
        rows = self.rows_per_partition if kind == "train" else max(self.rows_per_partition // 4, 1)
        x = rng.normal(size=(rows, self.features)).astype("float32")
        y = (x @ truth + 0.5 * rng.normal(size=rows) > 0).astype("int32")
        return {"x": x, "y": y}

    def build_model(self, spec: ModelSpec) -> Any:
        import keras

        p = spec.params
        model = keras.Sequential([
            keras.Input((self.features,)),
            keras.layers.Dense(int(p.get("hidden", 32)), activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ])
        model.compile(optimizer=keras.optimizers.Adam(float(p.get("lr", 1e-2))), loss="binary_crossentropy",
                      metrics=["accuracy"])
        return model

    def inputs(self, data: dict[str, np.ndarray], spec: ModelSpec, *, training: bool, seed: int) -> UnitInputs:
        x, y = data["x"], data["y"]
        if training:
            order = np.random.default_rng(seed).permutation(len(y))
            x, y = x[order], y[order]
        return UnitInputs(x=x, y=y, num_samples=len(y), batch_size=int(spec.params.get("batch_size", self.batch_size)))

    def custom_objects(self) -> dict[str, Any]:
        return {}
