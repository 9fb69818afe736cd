"""Faults made on purpose, shared by the fault tests of Spark workers and of local workers."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

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


def run_killing_one_worker_mid_unit(driver: Any) -> tuple[Any, list[int]]:
    """``driver.run()`` while a thread SIGKILLs one worker in the middle of a unit (~1 s units),
    once two units are done; returns the result and the killed pid (none if no unit was caught)."""
    killed: list[int] = []

    def kill() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            running = dict(driver._running)  # worker id -> unit in flight
            if len(driver._records) >= 2 and running:
                pid = driver._worker_info[sorted(running)[0]]["pid"]
                time.sleep(0.3)  # well inside a ~1 s unit
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    result = driver.run()
    killer.join(5)
    return result, killed
