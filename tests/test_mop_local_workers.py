"""MOP without Spark: the W workers as processes of this machine (mop/local_workers.py).

They run the Spark barrier tasks' worker loop, so the same seed must give the same schedule and
weights as on Spark; a worker process that dies must take the stage down and the search must
finish with every unit once; workers that cannot run must fail the run naming the partition, with
no process left behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import cloudpickle  # what the local workers' arguments travel with
import pytest

from cerebro_tasks.mop.runtime import MopDriver, MopError, run_mop
from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
from cerebro_tasks.mop.workload import ModelSpec

pytestmark = pytest.mark.slow

WORKERS = 2


def specs(n: int = 2, epochs: int = 2) -> list[ModelSpec]:
    return [ModelSpec(f"m{i}", {"lr": lr, "hidden": 8}, epochs, seed=i) for i, lr in enumerate([3e-2, 1e-2, 3e-3][:n])]


def each_unit_once(records: list[dict], n_models: int, epochs: int) -> bool:
    seen = Counter((r["unit"]["model_id"], r["unit"]["epoch"], r["unit"]["kind"], r["unit"]["partition"]) for r in records)
    return len(seen) == n_models * epochs * WORKERS * 2 and set(seen.values()) == {1}


def gone(pid: int) -> bool:
    """No such process any more (exited and reaped: not even a zombie)."""
    return not os.path.exists(f"/proc/{pid}")


def test_local_workers_train_exactly_as_spark_workers(spark, tmp_path):
    workload = SyntheticWorkload(rows_per_partition=256, features=8)
    runs = {name: run_mop(s, workload, specs(3), str(tmp_path / name), num_workers=WORKERS, seed=5)
            for name, s in (("spark", spark), ("local", None))}
    schedules = {name: [(r["worker_id"], tuple(sorted(r["unit"].items()))) for r in run.records]
                 for name, run in runs.items()}
    assert schedules["local"] == schedules["spark"]  # lockstep: same units, same workers, same order
    for model_id, history in runs["spark"].histories.items():
        for key, values in history.items():
            assert runs["local"].histories[model_id][key] == pytest.approx(values, rel=1e-5, abs=1e-6), (model_id, key)
    local = runs["local"].workers
    assert sorted(w["partition"] for w in local) == [0, 1] and len({w["pid"] for w in local}) == WORKERS
    assert all(w["pid"] != os.getpid() and gone(w["pid"]) for w in local)  # real child processes, all exited


def test_a_worker_process_killed_mid_unit_restarts_the_stage_and_nothing_runs_twice(tmp_path):
    workload = SyntheticWorkload(rows_per_partition=20_000, features=32, batch_size=32)  # ~1 s units
    driver = MopDriver(None, workload, str(tmp_path / "run"), num_workers=WORKERS, seed=3)
    for s in specs():
        driver.add(s)
    killed: list[int] = []

    def kill_one_worker_mid_unit() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            running = dict(driver._running)
            if len(driver._records) >= 2 and running:
                pid = driver._worker_info[sorted(running)[0]]["pid"]
                time.sleep(0.3)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_mid_unit, daemon=True)
    killer.start()
    result = driver.run()
    killer.join(5)
    assert killed, "the test never found a unit in flight to interrupt"
    assert each_unit_once(result.records, 2, 2) and result.units_run == len(result.records)
    pids = {w["pid"] for w in result.workers}
    assert killed[0] in pids and len(pids) > WORKERS  # the whole stage came back as new processes
    assert all(gone(pid) for pid in pids)


# the worker processes cannot import this test module: ship its classes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class DiesOnLoad(SyntheticWorkload):
    """Partition 1's worker dies as it reads its data (a native crash, say): every attempt."""

    def load_partition(self, kind, partition):
        if partition == 1:
            sys.stderr.write("reading partition 1: segmentation fault\n")
            sys.stderr.flush()
            os._exit(11)
        return super().load_partition(kind, partition)


def test_workers_that_keep_dying_fail_the_run_naming_the_partition_and_leave_nothing_running(tmp_path):
    driver = MopDriver(None, DiesOnLoad(rows_per_partition=256, features=8), str(tmp_path / "run"),
                       num_workers=WORKERS, seed=3, max_job_attempts=2)
    for s in specs(1, 1):
        driver.add(s)
    started = time.time()
    with pytest.raises(MopError) as raised:
        driver.run()
    message = str(raised.value)
    assert "local worker stage failed 2 times" in message
    assert "partition 1 exited with code 11" in message and "segmentation fault" in message
    assert time.time() - started < 120
    assert driver._worker_info and all(gone(w["pid"]) for w in driver._worker_info.values())
