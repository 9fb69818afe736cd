"""Warm models across hops (mop/model_cache.py, mop/checkpoint.py) on the real CNN-BiLSTM, no Spark.

Two `UnitRunner`s sharing one run store stand for two workers; models hop between them by their
checkpoints exactly as under MOP.
"""

from __future__ import annotations

import numpy as np
import pytest

from cerebro_tasks.mop.model_cache import ModelCache, WarmModel
from cerebro_tasks.mop.scheduler import Unit
from cerebro_tasks.mop.workload import ModelSpec


def test_lru_keeps_the_budget_and_the_newest_model():
    cache = ModelCache(budget_bytes=250)
    for name in ("a", "b"):
        assert cache.put(name, WarmModel(object(), 1, 100)) == []
    assert cache.take("a") is not None  # taken out while its unit runs: no longer held
    cache.put("a", WarmModel(object(), 2, 100))  # back as the most recent
    assert cache.put("c", WarmModel(object(), 1, 100)) == ["b"]  # least recently used goes first
    assert "a" in cache and "c" in cache and cache.evictions == 1
    assert cache.put("huge", WarmModel(object(), 1, 1000)) == ["a", "c"]
    assert len(cache) == 1 and "huge" in cache  # alone over budget, still kept: it is in use
    with pytest.raises(ValueError, match="budget"):
        ModelCache(-1)


PARAMS = {"amp_factor": 0.25, "window_minutes": 1, "learning_rate": 3e-3}


def _runners(tmp_path, sequences=16):
    """Two workers (P = 2) on one run store."""
    from cerebro_tasks.deeppostures.synthetic_workload import SyntheticCnnBilstmWorkload
    from cerebro_tasks.mop.worker import UnitRunner, configure_devices
    from cerebro_tasks.storage.store import Store

    configure_devices([], 1)
    workload = SyntheticCnnBilstmWorkload(sequences_per_partition=sequences, batch_size=16)
    store = Store(str(tmp_path / "run"))
    return workload, store, *(UnitRunner(workload, store, p, num_partitions=2) for p in range(2))


def _state(model):
    return model.get_weights() + [v.numpy() for v in model.optimizer.variables]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _fresh(store, model_id, step):
    """The model as Keras itself loads it from the whole-model checkpoint, nothing of ours involved."""
    import keras

    from cerebro_tasks.deeppostures.workload import custom_objects
    from cerebro_tasks.storage.layout import checkpoint_name

    return keras.saving.load_model(store.path(*checkpoint_name(model_id, step)), custom_objects=custom_objects())


@pytest.mark.slow
def test_a_warm_model_trains_exactly_as_a_freshly_loaded_one(tmp_path):
    """Models that differ only in learning rate share one built, traced model per worker (their
    graph); each hop reads only the model's own state into it, and trains exactly as that model
    would alone."""
    import keras

    from cerebro_tasks.mop.checkpoint import load_state

    workload, store, w0, w1 = _runners(tmp_path, sequences=32)
    a, b = ModelSpec("a", PARAMS, 2, seed=1), ModelSpec("b", {**PARAMS, "learning_rate": 1e-3}, 2, seed=2)
    assert w0.graph_key(a) == w0.graph_key(b) != w0.graph_key(ModelSpec("c", {**PARAMS, "l2": 1e-3}, 2))
    assert w0.run(Unit("a", 0, "train", 0, 0), a)["arrival"] == "cold"
    first_b = w0.run(Unit("b", 0, "train", 0, 0), b)  # b's initial state poured into a's built model
    assert first_b["arrival"] == "new" and first_b["traced"] and first_b["build_s"] > 0
    assert len(w0.cache) == 1
    hop = w1.run(Unit("a", 0, "train", 1, 1), a)  # a hops to worker 1, which has never built its graph
    assert hop["arrival"] == "cold" and hop["build_s"] > 0 and not hop["traced"]
    back = w0.run(Unit("a", 1, "train", 0, 2), a)  # back to worker 0, whose model holds b: state only
    assert back["arrival"] == "warm" and back["traced"] and back["build_s"] == 0.0
    stay = w0.run(Unit("a", 1, "val", 0, 3), a)  # a val unit right after, same worker: nothing to read
    assert stay["arrival"] == "stayed" and stay["load_s"] < 0.05

    # the warm path's state after step 2 equals training on a model Keras loads from ckpt-2.keras
    fresh = _fresh(store, "a", 2)
    inputs = workload.inputs(w0.data("train"), a, training=True, seed=a.seed * 100_003 + 2)
    fresh.fit(inputs.x, inputs.y, batch_size=inputs.batch_size, epochs=1, shuffle=False, verbose=0)
    warm = w0.cache.take(w0.graph_key(a))
    assert warm is not None and (warm.model_id, warm.step) == ("a", 3)
    _assert_same(_state(warm.model), _state(fresh))

    # b trained in a's graph equals b built alone from its seed and trained on the same rows: its
    # weights, its optimizer slots and its own learning rate, nothing of a's
    keras.utils.set_random_seed(b.seed)
    alone = workload.build_model(b)
    inputs = workload.inputs(w0.data("train"), b, training=True, seed=b.seed * 100_003)
    alone.fit(inputs.x, inputs.y, batch_size=inputs.batch_size, epochs=1, shuffle=False, verbose=0)
    shared = workload.build_model(a)
    load_state(store, shared, "b", 1)
    _assert_same(_state(shared), _state(alone))
    assert float(shared.optimizer.learning_rate) == pytest.approx(1e-3)


@pytest.mark.slow
def test_a_model_built_on_a_worker_traces_its_train_step_once(tmp_path):
    """Keras makes an optimizer's variables, and those of metrics compiled by name ("accuracy"),
    in the first traced train step; TensorFlow then traces that step again without them (3 of the
    CNN-BiLSTM's 7 s of first trace). A worker makes them first, so a model's first unit traces
    once, a cold hop in too, and trains exactly as Keras alone would."""
    from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
    from cerebro_tasks.mop.worker import UnitRunner
    from cerebro_tasks.storage.store import Store

    traces: list[str] = []

    class Counting(SyntheticWorkload):
        def build_model(self, spec):
            model = super().build_model(spec)
            step = model.train_step  # Keras calls self.train_step while it traces its train function

            def counted(data):
                traces.append(spec.model_id)
                return step(data)

            model.train_step = counted
            return model

    workload = Counting(rows_per_partition=256)
    store = Store(str(tmp_path / "run"))
    w0, w1 = (UnitRunner(workload, store, p, num_partitions=2) for p in range(2))
    spec = ModelSpec("a", {"hidden": 8}, 1, seed=1)
    w0.run(Unit("a", 0, "train", 0, 0), spec)
    assert traces == ["a"]
    assert w1.run(Unit("a", 0, "train", 1, 1), spec)["arrival"] == "cold"  # built there, its state read
    assert traces == ["a", "a"]

    # the same weights and optimizer state as Keras alone gives, variables made in its trace
    import keras

    keras.utils.set_random_seed(spec.seed)
    alone = SyntheticWorkload(rows_per_partition=256).build_model(spec)
    for p in range(2):
        inputs = workload.inputs(w0.data("train") if p == 0 else w1.data("train"), spec, training=True,
                                 seed=spec.seed * 100_003 + p)
        alone.fit(inputs.x, inputs.y, batch_size=inputs.batch_size, epochs=1, shuffle=False, verbose=0)
    _assert_same(_state(w1.cache.take("a").model), _state(alone))


@pytest.mark.slow
def test_a_model_keras_cannot_build_ahead_still_trains(tmp_path):
    """Building the variables ahead is an optimisation: a model whose build from shapes fails
    (here it raises) trains as before, its variables made in its first trace."""
    from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
    from cerebro_tasks.mop.worker import UnitRunner
    from cerebro_tasks.storage.store import Store

    class Unbuildable(SyntheticWorkload):
        def build_model(self, spec):
            model = super().build_model(spec)

            def refuse(**kwargs):
                raise RuntimeError("Unable to automatically build the model")

            model._symbolic_build = refuse
            return model

    runner = UnitRunner(Unbuildable(rows_per_partition=128), Store(str(tmp_path / "run")), 0, num_partitions=1)
    result = runner.run(Unit("a", 0, "train", 0, 0), ModelSpec("a", {"hidden": 4}, 1, seed=1))
    assert result["arrival"] == "cold" and result["num_samples"] == 128 and result["metrics"]["loss"] > 0


@pytest.mark.slow
def test_a_state_of_another_architecture_is_refused_by_name(tmp_path):
    from cerebro_tasks.deeppostures.workload import build_model
    from cerebro_tasks.mop.checkpoint import CheckpointError, load_state, save_state
    from cerebro_tasks.storage.store import Store

    store = Store(str(tmp_path / "run"))
    save_state(store, build_model(PARAMS, seed=1), "a", 1)
    save_state(store, build_model({**PARAMS, "l2": 1e-3}, seed=2), "b", 1)  # same variables, other loss
    wide = build_model({**PARAMS, "amp_factor": 0.5}, seed=1)
    with pytest.raises(CheckpointError, match=r"a/ckpt-00001.state: variable .*conv1/kernel is float32"):
        load_state(store, wide, "a", 1)
    load_state(store, twin := build_model(PARAMS, seed=3), "b", 1)  # what fits is read
    store.write_bytes(b"not a state", "models", "c", "ckpt-00001.state")
    with pytest.raises(CheckpointError, match="c/ckpt-00001.state: not a model state file"):
        load_state(store, twin, "c", 1)


@pytest.mark.slow
def test_a_failed_unit_leaves_no_trusted_model_behind(tmp_path):
    workload, store, w0, _ = _runners(tmp_path, sequences=16)
    a = ModelSpec("a", PARAMS, 2, seed=1)
    w0.run(Unit("a", 0, "train", 0, 0), a)
    with pytest.raises(FileNotFoundError):
        w0.run(Unit("a", 0, "train", 0, 5), a)  # no ckpt-5: reading the state fails
    assert w0.graph_key(a) not in w0.cache  # a half-way model is dropped, never served as a known state
    assert w0.run(Unit("a", 0, "val", 0, 1), a)["arrival"] == "cold"


@pytest.mark.slow
def test_worker_memory_stays_flat_while_models_hop(tmp_path):
    """Three models of one graph take turns on one worker, so every unit is a hop in: its model's
    state is read into the one built model. After a warm-up, resident memory must not grow with
    the units run. Rebuilding the model on every hop (the code before warm models) grew about
    15 MB per unit here."""
    from cerebro_tasks.mop.model_cache import rss_bytes

    workload, store, w0, _ = _runners(tmp_path, sequences=16)
    specs = [ModelSpec(f"m{i}", PARAMS, 99, seed=i) for i in range(3)]
    step = dict.fromkeys((s.model_id for s in specs), 0)

    def one_round() -> list[str]:
        arrivals = []
        for s in specs:
            result = w0.run(Unit(s.model_id, 0, "train", 0, step[s.model_id]), s)
            step[s.model_id] += 1
            arrivals.append(result.get("arrival"))
        return arrivals

    for _ in range(2):
        one_round()  # warm-up: every model built and its train function traced
    assert len(w0.cache) == 1
    before = rss_bytes()
    rounds = 8
    for _ in range(rounds):
        assert set(one_round()) == {"warm"}  # each unit reads its model's state into its built model
    units = rounds * len(specs)
    growth_mb_per_unit = (rss_bytes() - before) / (1 << 20) / units
    assert growth_mb_per_unit <= 1.0, f"worker memory grew {growth_mb_per_unit:.1f} MB per unit over {units} units"
