"""An ingest with nothing new answers without Spark; a step's failure reaches Airflow as its own line.

Real conversions (local Spark) make the dataset; the check must say "nothing to do" exactly when a
real conversion would change nothing, and step aside for every kind of change. The operators are
the real ones, run outside a scheduler (their `execute`), with real spark-submit where it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from cerebro_tasks.deeppostures.convert import convert
from cerebro_tasks.deeppostures.nothing_new import unchanged_report

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def converted(h5_tree_copy, tmp_path, spark):
    dataset = str(tmp_path / "dataset")
    first = convert(h5_tree_copy, dataset, spark=spark)
    return h5_tree_copy, dataset, first


def test_nothing_new_is_answered_like_a_real_rerun(converted, spark):
    h5, dataset, first = converted
    quick = unchanged_report(h5, dataset)
    rerun = convert(h5, dataset, spark=spark)
    assert quick is not None and quick["spark"] is False
    for key in ("version", "files", "windows", "subjects", "quarantine", "new_subjects", "removed"):
        assert quick[key] == rerun[key], key
    assert first["new_subjects"] == ["S0001", "S0002", "S0003", "S0004"] and rerun["new_subjects"] == []


@pytest.mark.parametrize("change", ["touched", "added", "removed", "crash_leftover", "bad_file"])
def test_any_change_goes_to_the_real_conversion(converted, change):
    h5, dataset, _ = converted
    day = os.path.join(h5, "S0001", sorted(os.listdir(os.path.join(h5, "S0001")))[0])
    if change == "touched":
        os.utime(day, ns=(time.time_ns(), time.time_ns()))
    elif change == "added":
        shutil.copytree(os.path.join(h5, "S0001"), os.path.join(h5, "S0009"))
    elif change == "removed":
        shutil.rmtree(os.path.join(h5, "S0004"))
    elif change == "crash_leftover":
        os.makedirs(os.path.join(dataset, "_staging", "run-1"))
    else:
        os.makedirs(os.path.join(h5, "S0010"))
        with open(os.path.join(h5, "S0010", "2024-01-01.h5"), "wb") as f:
            f.write(b"not hdf5")
    assert unchanged_report(h5, dataset) is None


def _cli(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cerebro_tasks.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    return proc, time.perf_counter() - started


def test_hourly_ingest_with_nothing_new_costs_next_to_nothing(h5_tree_copy, tmp_path):
    """By hand as under Airflow: the second `convert` starts no Spark application."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    dataset = str(tmp_path / "dataset")
    full, full_s = _cli("convert", "--input", h5_tree_copy, "--output", dataset, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    again, again_s = _cli("convert", "--input", h5_tree_copy, "--output", dataset, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(again.stdout)
    assert report["spark"] is False and report["files"]["skipped"] == 8
    assert "SparkContext" not in again.stderr and "spark" not in again.stderr.lower()
    print(f"convert with nothing new: {again_s:.2f} s wall, {again_s / full_s:.3f} of a full small conversion "
          f"({full_s:.2f} s)")
    assert again_s < 0.5 * full_s


def test_operator_answers_without_spark_submit(converted, airflow_env, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "plugins"))
    from cerebro_operators import CerebroSparkSubmitOperator

    h5, dataset, _ = converted
    monkeypatch.setenv("PATH", "/nonexistent")  # no spark-submit to be found, were it needed
    op = CerebroSparkSubmitOperator(task_id="convert", step="convert", step_args=["--input", h5, "--output", dataset],
                                    xcom_keys=["files", "version", "new_subjects"])
    assert op.execute({}) == {"files": {"listed": 8, "converted": 0, "skipped": 8, "unchanged_content": 0,
                                        "removed": 0, "quarantined": 0}, "version": 1, "new_subjects": []}


def test_a_failed_step_fails_the_task_with_its_own_line(airflow_env, tmp_path):
    """A configuration error is final (no retry) and reads as the step's message, not
    `Cannot execute: spark-submit ... Error code is: 2`."""
    sys.path.insert(0, os.path.join(ROOT, "plugins"))
    from airflow.sdk.exceptions import AirflowFailException
    from cerebro_operators import CerebroSparkSubmitOperator

    missing = str(tmp_path / "no-h5-here")
    op = CerebroSparkSubmitOperator(task_id="convert", step="convert",
                                    step_args=["--input", missing, "--output", str(tmp_path / "d")])
    with pytest.raises(AirflowFailException) as err:
        op.execute({})
    assert str(err.value) == f"cerebro-tasks convert: error: {missing}: field 'path': expected a directory of " \
                             "subject folders, found none"
    # the same error from inside a real spark-submit (split of a dataset that does not exist)
    op = CerebroSparkSubmitOperator(task_id="split", step="split",
                                    step_args=["--dataset", str(tmp_path / "none"), "--output", str(tmp_path / "p"),
                                               "--workers", "2"])
    with pytest.raises(AirflowFailException, match=r"^cerebro-tasks split: error: .*none: expected a windows dataset"):
        op.execute({})
