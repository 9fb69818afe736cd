"""The MOP runtime on real Spark (local[2]) with real Keras models hopping between two workers."""

from __future__ import annotations

import os
import sys
from collections import Counter

from pyspark import cloudpickle  # the copy Spark pickles tasks with

import pytest

from cerebro_tasks.mop.journal import Journal
from cerebro_tasks.mop.runtime import run_mop
from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
from cerebro_tasks.mop.workload import ModelSpec
from cerebro_tasks.storage.store import Store

pytestmark = pytest.mark.slow

WORKLOAD = SyntheticWorkload(rows_per_partition=512, features=16)


def specs(n: int = 3, epochs: int = 2) -> list[ModelSpec]:
    return [ModelSpec(f"m{i}", {"lr": lr, "hidden": 8}, epochs, seed=i) for i, lr in enumerate([3e-2, 1e-2, 3e-3][:n])]


@pytest.fixture(scope="module")
def first_run(spark, tmp_path_factory):
    run_url = str(tmp_path_factory.mktemp("mop") / "run")
    return run_url, run_mop(spark, WORKLOAD, specs(), run_url, num_workers=2, seed=1)


def test_every_model_visits_every_partition_once_per_epoch(first_run):
    _, result = first_run
    seen = Counter((r["unit"]["model_id"], r["unit"]["epoch"], r["unit"]["kind"], r["unit"]["partition"])
                   for r in result.records)
    assert set(seen.values()) == {1}
    assert len(seen) == 3 * 2 * (2 + 2)  # models x epochs x (train + val partitions)
    # both workers trained: models really hopped between processes
    assert {r["worker_id"].split(".")[0] for r in result.records} == {"p0", "p1"}
    assert len({r["worker"] for r in result.records}) == 2


def test_training_of_a_model_is_sequential(first_run):
    _, result = first_run
    for model_id in result.specs:
        train = sorted((r for r in result.records if r["unit"]["model_id"] == model_id and r["unit"]["kind"] == "train"),
                       key=lambda r: r["unit"]["step"])
        assert [r["unit"]["step"] for r in train] == [0, 1, 2, 3]
        for a, b in zip(train, train[1:]):
            assert a["end"] <= b["start"] + 1e-3  # never on two workers at once


def test_histories_and_checkpoints(first_run):
    run_url, result = first_run
    for model_id, h in result.histories.items():
        assert set(h) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
        assert all(len(v) == 2 for v in h.values())
    best = result.histories["m0"]
    assert best["val_loss"][-1] < best["val_loss"][0]
    assert best["val_accuracy"][-1] > 0.75  # the problem is learnable; the model learned it
    assert os.path.exists(os.path.join(run_url, "models", "m0", "ckpt-00004.keras"))
    assert len(Journal(Store(run_url)).records()) == 24
    assert 0 < result.figures["utilisation"] <= 1.0
    assert result.figures["reused_models"] >= 1  # a model staying on its worker was not reloaded


def checkpoints(run_url: str, model_id: str) -> list[str]:
    return sorted(os.listdir(os.path.join(run_url, "models", model_id)))


def test_only_the_checkpoints_still_needed_are_kept(first_run):
    """Default keep_checkpoints="needed", no selection metric: each model keeps its final one;
    every accepted attempt became the plain name, no attempt file is left behind; a finished model
    needs no hop state any more, only its whole final model."""
    run_url, result = first_run
    for model_id in result.specs:
        assert checkpoints(run_url, model_id) == ["ckpt-00004.keras"]
    assert all(len(r["attempt"]) == 12 for r in result.records)
    assert len({r["attempt"] for r in result.records}) == len(result.records)


def test_metrics_are_weighted_by_samples(first_run):
    _, result = first_run
    recs = [r for r in result.records if r["unit"]["model_id"] == "m1" and r["unit"]["kind"] == "val"
            and r["unit"]["epoch"] == 0]
    expected = sum(r["metrics"]["loss"] * r["num_samples"] for r in recs) / sum(r["num_samples"] for r in recs)
    assert result.histories["m1"]["val_loss"][0] == pytest.approx(expected)


def test_resume_of_a_finished_run_redoes_nothing(spark, first_run):
    run_url, result = first_run
    again = run_mop(spark, WORKLOAD, specs(), run_url, num_workers=2, seed=1)
    assert again.units_run == 0
    assert again.histories == result.histories


# the workers cannot import this test module: ship its classes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class UnreadableWorkload(SyntheticWorkload):
    def load_partition(self, kind: str, partition: int):
        if partition == 1:
            raise FileNotFoundError(f"/data/prepared/{kind}/part-1")
        return super().load_partition(kind, partition)


def test_an_unreadable_partition_stops_the_run_naming_it(spark, tmp_path):
    """A data fault is not a model fault: no retries per model, one error that says where."""
    from cerebro_tasks.mop.runtime import MopError

    workload = UnreadableWorkload(rows_per_partition=64, features=4)
    with pytest.raises(MopError, match=r"train partition 1 could not be read: FileNotFoundError: /data/prepared/train/part-1"):
        run_mop(spark, workload, specs(1, 1), str(tmp_path / "run"), num_workers=2, seed=1)


def test_one_driver_per_run(spark, tmp_path):
    """An Airflow zombie and its retry must not train the same run side by side."""
    from cerebro_tasks.mop.runtime import RUN_LOCK
    from cerebro_tasks.storage.store import LockedError

    run = Store(str(tmp_path / "run"))
    with run.lock(RUN_LOCK, heartbeat_s=30):  # a live driver holds the run
        with pytest.raises(LockedError, match="run.lock is held by"):
            run_mop(spark, WORKLOAD, specs(1, 1), run.url, num_workers=2, seed=1, lock_wait_s=0.5)


def test_a_lock_whose_owner_stopped_beating_is_taken_over(tmp_path):
    import json
    import time

    from cerebro_tasks.storage.store import Store

    store = Store(str(tmp_path))
    # a driver on another host, silent for longer than three heartbeats
    store.write_bytes(json.dumps({"host": "elsewhere", "pid": 1, "beat": time.time() - 100, "heartbeat_s": 30}).encode(),
                      "run.lock")
    with store.lock("run.lock", heartbeat_s=30):
        assert json.loads(store.read_bytes("run.lock"))["pid"] != 1
    assert not store.exists("run.lock")


class JitteryWorkload(SyntheticWorkload):
    """Units take a random extra 0-0.4 s (OS entropy, not a seed): timing noise, made large."""

    def inputs(self, data, spec, *, training, seed):
        import random
        import time

        time.sleep(random.SystemRandom().uniform(0.0, 0.4))
        return super().inputs(data, spec, training=training, seed=seed)


def test_lockstep_same_seed_same_schedule_and_weights_despite_timing_noise(spark, tmp_path):
    workload = JitteryWorkload(rows_per_partition=256, features=8)
    # which checkpoints are kept changes nothing else: the second run keeps all of them
    keep = [dict(select=("val_loss", "max")), dict(keep_checkpoints="all")]
    runs = [run_mop(spark, workload, specs(3, 2), str(tmp_path / f"run{i}"), num_workers=2, seed=5,
                    schedule="lockstep", **keep[i]) for i in range(2)]
    schedules = [[(r["worker_id"], tuple(sorted(r["unit"].items()))) for r in run.records] for run in runs]
    assert schedules[0] == schedules[1]  # same units, same workers, same order
    for model_id, history in runs[0].histories.items():
        for key, values in history.items():
            assert runs[1].histories[model_id][key] == pytest.approx(values, rel=1e-6, abs=1e-7), (model_id, key)

    for model_id, history in runs[0].histories.items():
        # every step's hop state; the whole model at each epoch's end (2 partitions: steps 2 and 4)
        all_steps = sorted([f"ckpt-{step:05d}.state" for step in range(1, 5)] + ["ckpt-00002.keras", "ckpt-00004.keras"])
        assert checkpoints(str(tmp_path / "run1"), model_id) == all_steps
        # kept: the final one, and the best epoch's by the selection metric (here: the highest loss)
        best_epoch = max(range(2), key=lambda e: history["val_loss"][e])
        best = f"ckpt-{(best_epoch + 1) * 2:05d}"
        expected = {"ckpt-00004.keras", f"{best}.keras"}
        assert set(checkpoints(str(tmp_path / "run0"), model_id)) == expected
