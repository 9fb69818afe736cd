"""Failing configurations through the real MOP driver on local Spark: never a hang, always a reason.

Models fail the ways real searches do: the model cannot be built, training raises after a few
batches, or the worker runs out of memory. The search goes on with the others; each failed
model is reported with its error's first line and the file holding its full tracebacks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from pyspark import cloudpickle  # the copy Spark pickles tasks with

from cerebro_tasks.mop.runtime import MopResult, error_line, run_mop
from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
from cerebro_tasks.mop.workload import ModelSpec, UnitInputs
from cerebro_tasks.storage import layout
from cerebro_tasks.storage.store import Store

# a run of a few tiny models takes 15-40 s here; a hang is anything far beyond that
DEADLINE_S = 240


def test_error_line_is_the_exception_not_the_frames() -> None:
    tb = ('Traceback (most recent call last):\n  File "w.py", line 3, in run\n    fit()\n'
          'RuntimeError: layer exploded after 3 batches\nmore detail\n')
    assert error_line(tb) == "RuntimeError: layer exploded after 3 batches"
    chained = ("Traceback (most recent call last):\n  File \"a\", line 1\nKeyError: 'x'\n\nDuring handling of "
               "the above exception, another exception occurred:\n\nTraceback (most recent call last):\n"
               "  File \"b\", line 2\nMemoryError\n")
    assert error_line(chained) == "MemoryError"
    assert error_line("HungUnitError: unit ran 70 s") == "HungUnitError: unit ran 70 s"


# the workers cannot import this test module: ship its classes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class FailingWorkload(SyntheticWorkload):
    """A model fails as its params["fail"] says: "build", "fit" (after 3 batches) or "oom"."""

    def build_model(self, spec: ModelSpec) -> Any:
        if spec.params.get("fail") == "build":
            raise ValueError(f"cannot build {spec.model_id}: negative layer width")
        return super().build_model(spec)

    def inputs(self, data: Any, spec: ModelSpec, *, training: bool, seed: int) -> UnitInputs:
        out = super().inputs(data, spec, training=training, seed=seed)
        fail = spec.params.get("fail")
        if training and fail in ("fit", "oom"):
            out.extra["callbacks"] = [_FailAfterBatches(3, fail)]
        return out


def _failing_callback_base() -> type:
    import keras

    return keras.callbacks.Callback


class _FailAfterBatches:
    """A Keras callback that raises mid-fit (created on the worker, where Keras is imported)."""

    def __new__(cls, batches: int, kind: str) -> Any:
        base = _failing_callback_base()

        class FailAfter(base):  # type: ignore[misc, valid-type]
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                if batch + 1 >= batches:
                    if kind == "oom":
                        raise MemoryError("failed to allocate 8.0 GiB for the batch activations")
                    raise RuntimeError(f"loss became NaN after {batches} batches")

        return FailAfter()


WORKLOAD = FailingWorkload(rows_per_partition=256, features=8, batch_size=32)


def spec(i: int, fail: str | None = None, epochs: int = 2) -> ModelSpec:
    params: dict[str, Any] = {"lr": 1e-2, "hidden": 8}
    if fail:
        params["fail"] = fail
    return ModelSpec(f"m{i}", params, epochs, seed=i)


def run_within_deadline(spark, specs: list[ModelSpec], run_url: str, **kwargs: Any) -> tuple[MopResult, float]:
    """run_mop in a thread: a hang fails the test (and its Spark job is cancelled) instead of blocking."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = run_mop(spark, WORKLOAD, specs, run_url, num_workers=2, seed=5, **kwargs)
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    started = time.time()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        spark.sparkContext.cancelAllJobs()
        pytest.fail(f"the search did not finish within {DEADLINE_S} s: it hangs")
    if "error" in out:
        raise out["error"]
    return out["result"], time.time() - started


def assert_reported(result: MopResult, model_id: str, expected_line: str) -> None:
    assert model_id in result.failed_models
    failure = result.failures[model_id]
    assert failure["error"] == expected_line
    path = Store(result.run_url).path(*layout.error_name(model_id))
    assert failure["traceback"].endswith(os.path.join(*layout.error_name(model_id)))
    with open(path) as f:
        text = f.read()
    # every failed attempt is on file with its full traceback: at least 1 + max_unit_retries (2)
    # of the unit that gave the model up
    assert text.count("Traceback (most recent call last)") >= 3 and expected_line in text


def assert_completed(result: MopResult, model_id: str, epochs: int = 2) -> None:
    assert model_id not in result.failed_models
    assert all(len(v) == epochs for v in result.histories[model_id].values())


@pytest.mark.slow
def test_one_of_two_models_fails_mid_fit_under_lockstep(spark, tmp_path) -> None:
    """The case that hung forever: the failed model's worker has nothing left to run while the
    other worker's result waits in lockstep for a turn that only the failed unit would have given."""
    result, seconds = run_within_deadline(spark, [spec(0), spec(1, "fit")], str(tmp_path / "run"))
    assert_completed(result, "m0")
    assert_reported(result, "m1", "RuntimeError: loss became NaN after 3 batches")
    assert result.failed_models == ["m1"]
    print(f"one of two failing (lockstep): {seconds:.1f} s")


@pytest.mark.slow
def test_several_fail_at_build_mid_fit_and_out_of_memory_adaptive(spark, tmp_path) -> None:
    specs = [spec(0, "build"), spec(1), spec(2, "oom"), spec(3, "fit")]
    result, seconds = run_within_deadline(spark, specs, str(tmp_path / "run"), schedule="adaptive")
    assert_completed(result, "m1")
    assert_reported(result, "m0", "ValueError: cannot build m0: negative layer width")
    assert_reported(result, "m2", "MemoryError: failed to allocate 8.0 GiB for the batch activations")
    assert_reported(result, "m3", "RuntimeError: loss became NaN after 3 batches")
    assert sorted(result.failed_models) == ["m0", "m2", "m3"]
    print(f"three of four failing (adaptive): {seconds:.1f} s")


@pytest.mark.slow
def test_all_models_fail_under_lockstep(spark, tmp_path) -> None:
    result, seconds = run_within_deadline(spark, [spec(0, "build"), spec(1, "oom")], str(tmp_path / "run"))
    assert sorted(result.failed_models) == ["m0", "m1"] and not result.histories
    assert_reported(result, "m0", "ValueError: cannot build m0: negative layer width")
    assert_reported(result, "m1", "MemoryError: failed to allocate 8.0 GiB for the batch activations")
    assert not spark.sparkContext.statusTracker().getActiveJobsIds()
    print(f"all failing (lockstep): {seconds:.1f} s")


def assert_nothing_left_running(spark, within_s: float = 10.0) -> None:
    tracker = spark.sparkContext.statusTracker()
    deadline = time.time() + within_s
    while (tracker.getActiveStageIds() or tracker.getActiveJobsIds()) and time.time() < deadline:
        time.sleep(0.2)
    assert not tracker.getActiveStageIds() and not tracker.getActiveJobsIds()


@pytest.mark.slow
def test_start_timeout_cancels_the_worker_stage(spark, tmp_path) -> None:
    """Three barrier tasks on two cores never start; the driver gives up and takes its job along
    (Spark itself would keep re-checking for free slots for ten minutes)."""
    from cerebro_tasks.mop.runtime import MopError

    with pytest.raises(MopError, match="no MOP worker connected within 3 s"):
        run_mop(spark, WORKLOAD, [spec(0)], str(tmp_path / "run"), num_workers=3, start_timeout_s=3)
    assert_nothing_left_running(spark)


@pytest.mark.slow
def test_interrupted_driver_cancels_the_worker_stage(spark, tmp_path) -> None:
    def interrupt(model_id: str, history: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_within_deadline(spark, [spec(0, epochs=1), spec(1, epochs=3)], str(tmp_path / "run"),
                            on_model_done=interrupt)
    assert_nothing_left_running(spark)


def test_a_worker_lost_twice_in_one_batch_of_events_is_handled_once(tmp_path) -> None:
    """A failed send loses a worker while its connection's EOF is still in the batch being read:
    the second loss must be a no-op, not an 'unknown worker' error that kills the run."""
    from multiprocessing import Pipe

    from cerebro_tasks.mop.runtime import MopDriver

    driver = MopDriver(None, WORKLOAD, str(tmp_path / "run"), num_workers=2)
    driver.add(spec(0))
    for p in range(2):
        driver._conns[f"p{p}.1"], _ = Pipe()
        driver.scheduler.worker_joined(f"p{p}.1", p)
    driver._dispatch()  # one model: one train unit in flight
    (busy, unit), = driver._running.items()
    driver._lose_worker(busy)
    driver._lose_worker(busy)
    idle = ({"p0.1", "p1.1"} - {busy}).pop()
    assert list(driver.scheduler.workers) == [idle] and not driver._attempts and not driver.scheduler.running
    assert driver.scheduler.model_status("m0").state == "running"  # its unit is pending again, not lost
