"""Whole models written behind (mop/worker.py, mop/runtime.py): an epoch's `.keras` is written after
its unit reported, from the state the unit ended with, and published by the driver; a write that
fails is made again from the committed state, a writer lost takes nothing with it, and a resumed
run writes what an earlier attempt left behind.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from pyspark import cloudpickle  # the copy Spark pickles tasks with

from cerebro_tasks.mop.runtime import MAX_WHOLE_TRIES, run_mop
from cerebro_tasks.mop.scheduler import Unit
from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
from cerebro_tasks.mop.workload import ModelSpec
from cerebro_tasks.storage import layout
from cerebro_tasks.storage.store import Store

pytestmark = pytest.mark.slow

W, EPOCHS = 2, 2
FINAL = EPOCHS * W


@dataclass(frozen=True)
class FragileWorkload(SyntheticWorkload):
    """Models of one graph per width (their learning rates travel in their state). A model's
    params["fragile"] breaks the writing of its whole model (Keras asks each layer for its config
    then, and only then): "once" raises the first time, "always" every time, "exit" ends the
    worker's process the first time. Markers under `markers` say it happened."""

    markers: str = ""
    slow_partition: int = -1  # its train units take 0.3 s longer than their cost says

    def inputs(self, data: Any, spec: ModelSpec, *, training: bool, seed: int) -> Any:
        if training and int(data["partition"]) == self.slow_partition:
            import time

            time.sleep(0.3)
        return super().inputs(data, spec, training=training, seed=seed)

    def load_partition(self, kind: str, partition: int) -> dict[str, np.ndarray]:
        return {**super().load_partition(kind, partition), "partition": np.asarray(partition)}

    def graph_key(self, spec: ModelSpec) -> str:
        # a fragile model's graph is its own: a model sharing its built model would break with it
        return f"hidden={spec.params.get('hidden', 32)},fragile={spec.params.get('fragile')}"

    def build_model(self, spec: ModelSpec) -> Any:
        model = super().build_model(spec)
        fragile = spec.params.get("fragile")
        if fragile:
            marker = os.path.join(self.markers, spec.model_id)
            layer = model.layers[0]
            config = layer.get_config

            def get_config() -> dict[str, Any]:
                first = not os.path.exists(marker)
                if first or fragile == "always":
                    open(marker, "a").close()
                    if fragile == "exit":
                        os._exit(3)
                    raise RuntimeError(f"cannot serialise a layer of {spec.model_id}")
                return config()

            layer.get_config = get_config  # the saved file still names a plain Dense
        return model


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def state_of(model: Any) -> list[np.ndarray]:
    return [np.asarray(v) for v in model.weights] + [np.asarray(v) for v in model.optimizer.variables]


def whole_model(store: Store, model_id: str, step: int) -> Any:
    import keras

    return keras.saving.load_model(store.path(*layout.checkpoint_name(model_id, step)))


def assert_same(a: list[np.ndarray], b: list[np.ndarray], exact: bool = True) -> None:
    """Equal arrays: bit for bit (copies of one state), or to float tolerance (two trainings)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_a_whole_model_written_behind_is_the_state_its_unit_ended_with(tmp_path):
    """Written later, after the built model of its graph has trained other models, a whole model
    is still exactly what writing it at once gives; the warm model is not mistaken for another's."""
    from cerebro_tasks.mop.worker import UnitRunner, configure_devices

    configure_devices([], 1)
    workload = FragileWorkload(rows_per_partition=256, features=8)
    a, b = ModelSpec("a", {"lr": 1e-2, "hidden": 8}, 3, seed=1), ModelSpec("b", {"lr": 3e-3, "hidden": 8}, 3, seed=2)
    stores = {mode: Store(str(tmp_path / mode)) for mode in ("now", "behind")}
    # one partition: every train unit ends an epoch, so every one leaves a whole model
    runners = {mode: UnitRunner(workload, store, 0, num_partitions=1, write_behind=mode == "behind")
               for mode, store in stores.items()}
    units = [(Unit("a", 0, "train", 0, 0), a), (Unit("b", 0, "train", 0, 0), b), (Unit("a", 1, "train", 0, 1), a)]
    for mode, runner in runners.items():
        for unit, spec in units:
            assert runner.run(unit, spec)["whole"] == ("behind" if mode == "behind" else "written")
    behind = runners["behind"]
    assert [(job.spec.model_id, job.step) for job in behind.behind] == [("a", 1), ("b", 1), ("a", 2)]
    assert not stores["behind"].exists(*layout.checkpoint_name("a", 1))  # nothing written yet
    while behind.behind:
        job, seconds = behind.write_behind()
        assert seconds > 0
    for model_id, step in [("a", 1), ("b", 1), ("a", 2)]:
        assert_same(state_of(whole_model(stores["behind"], model_id, step)),
                    state_of(whole_model(stores["now"], model_id, step)), exact=False)
    # the built model now holds a's step 2 (the last written), so b's next unit reads b's own state
    after = {mode: runner.run(Unit("b", 1, "train", 0, 1), b) for mode, runner in runners.items()}
    assert after["behind"]["arrival"] == "warm"
    assert [(job.spec.model_id, job.step) for job in behind.behind] == [("b", 2)]
    behind.drop_behind("b", 2, None)  # the driver no longer wants it: it is never written
    assert not behind.behind and not stores["behind"].exists(*layout.checkpoint_name("b", 2))
    assert_same(state_of(behind.cache.take(behind.graph_key(b)).model),
                state_of(runners["now"].cache.take(runners["now"].graph_key(b)).model), exact=False)


def specs(*fragile: str | None) -> list[ModelSpec]:
    return [ModelSpec(f"m{i}", {"lr": 1e-2, "hidden": 8, **({"fragile": f} if f else {})}, EPOCHS, seed=i)
            for i, f in enumerate(fragile)]


def run(spark, tmp_path, models: list[ModelSpec], slow_partition: int = -1, **kwargs: Any):
    workload = FragileWorkload(rows_per_partition=512, features=8, markers=str(tmp_path), slow_partition=slow_partition)
    return run_mop(spark, workload, models, str(tmp_path / "run"), num_workers=W, seed=4, **kwargs)


def files(run_url: str, model_id: str) -> list[str]:
    return sorted(os.listdir(os.path.join(run_url, layout.MODELS_DIR, model_id)))


def assert_each_unit_once(records: list[dict[str, Any]], models: int) -> None:
    seen = Counter((r["unit"]["model_id"], r["unit"]["epoch"], r["unit"]["kind"], r["unit"]["partition"])
                   for r in records)
    assert len(seen) == models * EPOCHS * W * 2 and set(seen.values()) == {1}, seen


def assert_wholes_are_their_states(run_url: str, model_id: str) -> None:
    """Every epoch's whole model holds exactly the state its step's hop checkpoint holds."""
    from cerebro_tasks.mop.checkpoint import load_state

    store = Store(run_url)
    for step in range(W, FINAL + 1, W):
        model = whole_model(store, model_id, step)
        expected = state_of(model)
        load_state(store, model, model_id, step)
        assert_same(state_of(model), expected)


def test_writes_behind_are_published_and_the_same_as_writing_them_at_once(spark, tmp_path):
    behind = run(spark, tmp_path / "behind", specs(None, None), keep_checkpoints="all")
    epoch_ends = [r for r in behind.records if r["unit"]["kind"] == "train" and (r["unit"]["step"] + 1) % W == 0]
    assert {r["whole"] for r in epoch_ends} == {"behind"}
    assert behind.figures["wholes_written_behind"] == len(epoch_ends) == 2 * EPOCHS
    for model_id in behind.specs:
        assert not [f for f in files(behind.run_url, model_id) if len(f.split(".")) > 2]  # no attempt file left
        assert_wholes_are_their_states(behind.run_url, model_id)


def test_a_whole_model_that_cannot_be_written_is_written_again_then_gives_its_model_up(spark, tmp_path):
    result = run(spark, tmp_path, specs("once", None, "always"))
    assert result.failed_models == ["m2"]
    assert result.failures["m2"]["error"] == "RuntimeError: cannot serialise a layer of m2"
    with open(Store(result.run_url).path(*layout.error_name("m2"))) as f:
        assert f.read().count("RuntimeError: cannot serialise") >= MAX_WHOLE_TRIES
    for model_id in ("m0", "m1"):  # m0's first write failed; it was written again from its state
        assert all(len(v) == EPOCHS for v in result.histories[model_id].values())
        assert files(result.run_url, model_id) == [f"ckpt-{FINAL:05d}.keras"]
        whole_model(Store(result.run_url), model_id, FINAL)
    assert os.path.exists(tmp_path / "m0")


def test_a_worker_lost_while_writing_behind_loses_no_checkpoint(spark, tmp_path):
    result = run(spark, tmp_path, specs("exit", None), keep_checkpoints="all")
    assert os.path.exists(tmp_path / "m0")  # a worker did end mid-write
    assert len({w["pid"] for w in result.workers}) > W  # and the stage came back as new processes
    assert not result.failed_models
    assert_each_unit_once(result.records, 2)
    for model_id in result.specs:
        assert not [f for f in files(result.run_url, model_id) if len(f.split(".")) > 2]
        assert_wholes_are_their_states(result.run_url, model_id)


def test_a_resumed_run_writes_the_whole_models_left_behind(spark, tmp_path):
    """A driver that stopped while a whole model was still behind: the journal has its unit, the
    run store its state; the resumed run writes it, and trains nothing again."""
    first = run(spark, tmp_path, specs(None, None), keep_checkpoints="all")
    store = Store(first.run_url)
    before = state_of(whole_model(store, "m1", FINAL))
    store.delete(*layout.checkpoint_name("m1", FINAL))
    again = run(spark, tmp_path, specs(None, None), keep_checkpoints="all")
    assert again.units_run == 0 and again.histories == first.histories
    assert again.figures["wholes_written_behind"] == 1
    assert_same(state_of(whole_model(store, "m1", FINAL)), before)


def test_wholes_written_while_lockstep_holds_their_units_results_are_published(spark, tmp_path):
    """Worker 0's train units are slower than their costs say, so lockstep holds worker 1's results
    until worker 0's, first in virtual time, are in; worker 1 writes its wholes meanwhile, and they
    are published once their units are accepted: none is lost, asked again or mistaken for hung."""
    result = run(spark, tmp_path, specs(None, None, None), slow_partition=0, keep_checkpoints="all")
    epoch_ends = [r for r in result.records if r["unit"]["kind"] == "train" and (r["unit"]["step"] + 1) % W == 0]
    assert result.figures["wholes_written_behind"] == len(epoch_ends) == 3 * EPOCHS
    assert len({w["pid"] for w in result.workers}) == W  # no stage restart
    for model_id in result.specs:
        assert_wholes_are_their_states(result.run_url, model_id)


def test_the_collection_keeps_an_unvalidated_epochs_whole_model_when_selecting(tmp_path):
    """With a selection metric, an epoch whose validation is not complete may still turn out the best:
    its whole model stays while the model trains on; without one it goes. Partial files of writers
    given up on go; a partial of a plain name (someone's write in progress) stays."""
    from cerebro_tasks.mop.runtime import MopDriver

    kept = {}
    for select in (("val_loss", "min"), None):
        folder = str(tmp_path / f"run-{select is not None}")
        store = Store(folder)
        driver = MopDriver(None, SyntheticWorkload(), store.url_of(), num_workers=W, select=select)
        driver.add(ModelSpec("m0", {}, EPOCHS, seed=0))
        for unit in (Unit("m0", 0, "train", 0, 0), Unit("m0", 0, "train", 1, 1), Unit("m0", 1, "train", 0, 2)):
            driver.scheduler.restore_finished(unit)  # epoch 0 trained, not validated; one unit into epoch 1
        names = [layout.checkpoint_name("m0", 2)[-1], layout.state_name("m0", 2)[-1], layout.state_name("m0", 3)[-1],
                 ".tmp-77-" + layout.checkpoint_name("m0", 3, "deadbeef0000")[-1],
                 ".tmp-77-" + layout.checkpoint_name("m0", 4)[-1]]
        for name in names:
            store.write_bytes(b"x", layout.MODELS_DIR, "m0", name)
        driver._collect_checkpoints("m0")
        kept[select is not None] = files(folder, "m0")
    assert kept[True] == sorted(["ckpt-00002.keras", "ckpt-00002.state", "ckpt-00003.state", ".tmp-77-ckpt-00004.keras"])
    assert kept[False] == sorted(["ckpt-00002.state", "ckpt-00003.state", ".tmp-77-ckpt-00004.keras"])
