"""MOP without Spark: the W workers as processes of this machine (mop/local_workers.py).

They run the Spark barrier tasks' worker loop, so the same seed must give the same schedule and
weights as on Spark. A worker process that dies, or hangs, must take the stage down and the search
must finish with every unit once; workers that cannot run must fail the run naming the partition;
a driver that is killed must take its workers with it: no process left behind on any path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass

import cloudpickle  # what the local workers' arguments travel with
import pytest

from cerebro_tasks.mop.runtime import MopDriver, MopError, run_mop
from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
from cerebro_tasks.mop.workload import ModelSpec
from tests.support.faults import HangOnceWorkload, run_killing_one_worker_mid_unit
from tests.support.procs import live_processes, running

pytestmark = pytest.mark.slow

WORKERS = 2


def specs(n: int = 2, epochs: int = 2) -> list[ModelSpec]:
    return [ModelSpec(f"m{i}", {"lr": lr, "hidden": 8}, epochs, seed=i) for i, lr in enumerate([3e-2, 1e-2, 3e-3][:n])]


def each_unit_once(records: list[dict], n_models: int, epochs: int) -> bool:
    seen = Counter((r["unit"]["model_id"], r["unit"]["epoch"], r["unit"]["kind"], r["unit"]["partition"]) for r in records)
    return len(seen) == n_models * epochs * WORKERS * 2 and set(seen.values()) == {1}


def gone(pid: int) -> bool:
    """No such process running any more (a zombie left for a parent to reap counts as gone)."""
    return not running(pid)


def local_workers_of(parent: int) -> list[int]:
    """The running local worker processes whose parent is `parent`."""
    return [p.pid for p in live_processes() if p.ppid == parent and b"cerebro_tasks.mop.local_workers" in p.cmdline]


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
    assert [w["cuda_visible_devices"] for w in local] == ["", ""]  # no local_gpus: CPU, whatever the driver had


def test_a_worker_process_killed_mid_unit_restarts_the_stage_and_nothing_runs_twice(tmp_path):
    workload = SyntheticWorkload(rows_per_partition=20_000, features=32, batch_size=32)  # ~1 s units
    driver = MopDriver(None, workload, str(tmp_path / "run"), num_workers=WORKERS, seed=3, local_gpus=["0", "1"])
    for s in specs():
        driver.add(s)
    result, killed = run_killing_one_worker_mid_unit(driver)
    assert killed, "the test never found a unit in flight to interrupt"
    assert each_unit_once(result.records, 2, 2) and result.units_run == len(result.records)
    pids = {w["pid"] for w in result.workers}
    assert killed[0] in pids and len(pids) > WORKERS  # the whole stage came back as new processes
    assert all(gone(pid) for pid in pids) and not local_workers_of(os.getpid())
    # each worker saw exactly its GPU id (no CUDA here: the backend runs on CPU all the same)
    assert {(w["partition"], w["cuda_visible_devices"]) for w in result.workers} == {(0, "0"), (1, "1")}


# the worker processes cannot import this test module: ship its classes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class DiesOnLoad(SyntheticWorkload):
    """Partition 1's worker process ends as it reads its data, every attempt: a native crash (code
    11) or a clean exit (code 0) that no exception handler sees."""

    code: int = 11

    def load_partition(self, kind, partition):
        if partition == 1:
            sys.stderr.write("reading partition 1: segmentation fault\n")
            sys.stderr.flush()
            os._exit(self.code)
        return super().load_partition(kind, partition)


@pytest.mark.parametrize("code", [11, 0])
def test_workers_that_keep_ending_fail_the_run_naming_the_partition_and_leave_nothing_running(tmp_path, code):
    driver = MopDriver(None, DiesOnLoad(rows_per_partition=256, features=8, code=code), str(tmp_path / "run"),
                       num_workers=WORKERS, seed=3, max_job_attempts=2)
    for s in specs(1, 1):
        driver.add(s)
    started = time.time()
    with pytest.raises(MopError) as raised:
        driver.run()
    message = str(raised.value)
    assert "local worker stage failed 2 times in a row" in message
    assert f"partition 1 exited with code {code}" in message and "segmentation fault" in message
    assert time.time() - started < 300
    assert driver._worker_info and all(gone(w["pid"]) for w in driver._worker_info.values())
    assert not local_workers_of(os.getpid())


def test_a_hung_unit_cancels_the_local_workers_and_the_search_completes(tmp_path):
    workload = HangOnceWorkload(rows_per_partition=2_000, features=8, marker=str(tmp_path / "hung"))
    driver = MopDriver(None, workload, str(tmp_path / "run"), num_workers=WORKERS, seed=3, unit_timeout_s=8)
    for s in specs():
        driver.add(s)
    result = driver.run()
    assert os.path.exists(tmp_path / "hung") and not result.failed_models
    assert each_unit_once(result.records, 2, 2)
    assert len({w["pid"] for w in result.workers}) > WORKERS  # the hung worker's stage was started afresh
    assert not local_workers_of(os.getpid())  # the hung process too is gone


def test_a_workload_that_cannot_travel_fails_before_any_worker_starts(tmp_path):
    @dataclass(frozen=True)
    class Unsendable(SyntheticWorkload):
        lock: object = None

    driver = MopDriver(None, Unsendable(lock=threading.Lock()), str(tmp_path / "run"), num_workers=WORKERS)
    driver.add(specs(1, 1)[0])
    with pytest.raises(MopError, match="Unsendable.*cannot be sent to the local worker processes"):
        driver.run()
    assert not local_workers_of(os.getpid())


def test_local_gpus_must_be_a_list_of_ids_for_local_workers(spark, tmp_path):
    with pytest.raises(MopError, match="a list of GPU ids"):
        MopDriver(None, SyntheticWorkload(), str(tmp_path / "a"), num_workers=WORKERS, local_gpus="0,1")
    with pytest.raises(MopError, match="with Spark, each worker's GPUs"):
        MopDriver(spark, SyntheticWorkload(), str(tmp_path / "b"), num_workers=WORKERS, local_gpus=["0"])


DRIVER = textwrap.dedent("""
    import os, sys, time
    from cerebro_tasks.mop.runtime import run_mop
    from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
    from cerebro_tasks.mop.workload import ModelSpec

    from dataclasses import dataclass

    @dataclass(frozen=True)
    class HangsInM1(SyntheticWorkload):  # m1's units hang: its worker is deaf to everything but signals
        marker: str = ""

        def inputs(self, data, spec, *, training, seed):
            if spec.model_id == "m1":
                open(self.marker, "w").close()
                time.sleep(3600)
            return super().inputs(data, spec, training=training, seed=seed)

    specs = [ModelSpec(f"m{i}", {"lr": 1e-2, "hidden": 8}, 2, seed=i) for i in range(2)]
    run_mop(None, HangsInM1(rows_per_partition=256, features=8, marker=sys.argv[2]), specs, sys.argv[1], num_workers=2)
""")


def test_a_driver_killed_outright_takes_its_local_workers_with_it(tmp_path):
    hung = tmp_path / "hung"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "run"), str(hung)],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not hung.exists() and driver.poll() is None:
            time.sleep(0.2)
        assert hung.exists(), "no unit of m1 started"
        workers = local_workers_of(driver.pid)
        assert len(workers) == WORKERS
    finally:
        driver.kill()  # SIGKILL: no finally, no atexit in the driver
        driver.wait()
    # a worker mid-unit (here: one that never ends its unit) learns it from its stdin's end
    deadline = time.time() + 30
    while time.time() < deadline and not all(gone(pid) for pid in workers):
        time.sleep(0.2)
    assert all(gone(pid) for pid in workers), "a local worker outlived its killed driver"
