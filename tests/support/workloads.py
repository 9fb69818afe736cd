"""Workloads that misbehave on purpose, shared by the fault tests of Spark and of local workers."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import cloudpickle
from pyspark import cloudpickle as spark_cloudpickle

from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload


@dataclass(frozen=True)
class HangOnceWorkload(SyntheticWorkload):
    """m1's first train unit hangs (a deadlocked input pipeline, say); its re-run does not."""

    marker: str = ""

    def inputs(self, data, spec, *, training, seed):
        if training and spec.model_id == "m1" and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)
        return super().inputs(data, spec, training=training, seed=seed)


# Spark's executors cannot import this module (local workers could: they get the driver's path):
# ship its classes by value, with the copy of cloudpickle each kind of worker receives them with
for pickler in (cloudpickle, spark_cloudpickle):
    pickler.register_pickle_by_value(sys.modules[__name__])
