"""Fault tolerance with real processes: a worker killed mid-unit, a driver killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from cerebro_tasks.mop.journal import Journal
from cerebro_tasks.mop.runtime import MopDriver
from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
from cerebro_tasks.mop.workload import ModelSpec
from cerebro_tasks.storage.store import Store
from tests.support.faults import HangOnceWorkload, run_killing_one_worker_mid_unit

pytestmark = pytest.mark.slow

# units of about a second each, so that a kill lands in the middle of one
WORKLOAD = SyntheticWorkload(rows_per_partition=20_000, features=32, batch_size=32)
MODELS, EPOCHS, WORKERS = 2, 2, 2
TOTAL_UNITS = MODELS * EPOCHS * WORKERS * 2  # train + val units


def specs() -> list[ModelSpec]:
    return [ModelSpec(f"m{i}", {"lr": 1e-2, "hidden": 16}, EPOCHS, seed=i) for i in range(MODELS)]


def assert_each_unit_once(records: list[dict]) -> None:
    seen = Counter((r["unit"]["model_id"], r["unit"]["epoch"], r["unit"]["kind"], r["unit"]["partition"]) for r in records)
    assert len(seen) == TOTAL_UNITS and set(seen.values()) == {1}, seen


def test_worker_killed_mid_unit(spark, tmp_path):
    driver = MopDriver(spark, WORKLOAD, str(tmp_path / "run"), num_workers=WORKERS, seed=3)
    for s in specs():
        driver.add(s)
    result, killed = run_killing_one_worker_mid_unit(driver)
    assert killed, "the test never found a unit in flight to interrupt"
    assert_each_unit_once(result.records)
    assert_each_unit_once(Journal(Store(str(tmp_path / "run"))).records())
    assert result.units_run == TOTAL_UNITS  # the lost unit ran again; nothing counted twice
    assert all(len(v) == EPOCHS for h in result.histories.values() for v in h.values())
    pids = {w["pid"] for w in result.workers}
    assert killed[0] in pids and len(pids) > WORKERS  # workers came back as new processes


DRIVER = textwrap.dedent("""
    import json, sys
    from cerebro_tasks.spark_session import get_spark
    from cerebro_tasks.mop.runtime import run_mop
    from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
    from cerebro_tasks.mop.workload import ModelSpec
    spark = get_spark("driver-kill", master="local[2,3]")
    specs = [ModelSpec(f"m{i}", {"lr": 1e-2, "hidden": 16}, %(epochs)d, seed=i) for i in range(%(models)d)]
    r = run_mop(spark, SyntheticWorkload(rows_per_partition=20000, features=32, batch_size=32), specs, sys.argv[1],
                num_workers=%(workers)d, seed=3)
    print("RESULT " + json.dumps({"units_run": r.units_run, "histories": r.histories}))
""" % {"epochs": EPOCHS, "models": MODELS, "workers": WORKERS})


def test_driver_killed_then_resubmitted_resumes(tmp_path):
    run_url = str(tmp_path / "run")
    journal = Journal(Store(run_url))
    cmd = [sys.executable, "-c", DRIVER, run_url]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(journal.records()) < 4 and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # spark-submit dies: driver, JVM and Python workers at once
    first.wait()
    done_before = len(journal.records())
    assert 4 <= done_before < TOTAL_UNITS

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    result = json.loads(second.stdout.split("RESULT ", 1)[1])
    assert_each_unit_once(journal.records())
    # only the units not yet on record were run again (at most W were in flight at the kill)
    assert result["units_run"] == TOTAL_UNITS - done_before
    assert all(len(v) == EPOCHS for h in result["histories"].values() for v in h.values())


def test_hung_unit_is_failed_and_its_worker_restarted(spark, tmp_path):
    marker = str(tmp_path / "hung")
    workload = HangOnceWorkload(rows_per_partition=2_000, features=8, marker=marker)
    started = time.time()
    driver = MopDriver(spark, workload, str(tmp_path / "run"), num_workers=WORKERS, seed=3, unit_timeout_s=8)
    for spec in specs():
        driver.add(spec)
    result = driver.run()
    assert os.path.exists(marker)  # the hang happened
    assert_each_unit_once(result.records)
    assert not result.failed_models and time.time() - started < 240
    status = driver.scheduler.model_status("m1")
    assert status.state == "done" and status.retries == 1  # the hang was charged to its unit
