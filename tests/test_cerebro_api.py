"""Cerebro's API on MOP: backend, stores, estimator, grid/random search, the result, TensorBoard, plots.

The Spark tests share one small generated problem (320 rows, 8 features, 2 workers on local[2]); the
TPE search and Spark ML vector columns are exercised by tests/test_quickstart_script.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from cerebro_tasks.search.space import hp_choice, hp_loguniform, hp_quniform, hp_uniform, parse_space, sample

ROWS, FEATURES = 320, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_rows(seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, FEATURES))
    y = (x @ rng.normal(size=FEATURES) + 0.3 * rng.normal(size=ROWS) > 0).astype(float)
    return [(i, x[i].tolist(), float(y[i]), bool(i % 5 == 0)) for i in range(ROWS)]


def estimator_gen_fn(params):
    import keras

    from cerebro_tasks import SparkEstimator

    model = keras.Sequential([keras.Input((FEATURES,), name="features"),
                              keras.layers.Dense(int(params.get("units", 8)), activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    return SparkEstimator(model=model, optimizer=keras.optimizers.Adam(learning_rate=params["lr"]),
                          loss="binary_crossentropy", metrics=["acc"], batch_size=int(params.get("batch_size", 16)))


def zero_features(dataset):
    """A transformation_fn in Cerebro's form (rows are namedtuples of the columns): blank the features."""
    return dataset.map(lambda row: row._replace(features=row.features * 0.0))


UNIT_LOG: list[str] = []  # where the test below wants its callback to write


def blind_estimator_gen_fn(params):
    # defined in this test module, which Spark workers cannot import: it must travel by value
    import keras

    class UnitLog(keras.callbacks.Callback):
        """Appends one line per training unit (one fit call: a sub-epoch on one partition)."""

        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def on_train_end(self, logs=None):
            with open(self.path, "a") as f:
                f.write(json.dumps(sorted(logs or {})) + "\n")

    return (estimator_gen_fn(params).setTransformationFn(zero_features)
            .setCallbacks([UnitLog(UNIT_LOG[0])] if UNIT_LOG else []))


# fast: no Spark -------------------------------------------------------------------------------------------

def test_import_is_light():
    code = ("import sys, cerebro_tasks; heavy = [m for m in ('tensorflow', 'keras', 'pyspark') if m in sys.modules]; "
            "assert not heavy, heavy; assert 'GridSearch' in dir(cerebro_tasks)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_public_names():
    import cerebro_tasks
    from cerebro_tasks.cerebro.search import TPESearch

    for name in ("SparkBackend", "SparkEstimator", "LocalStore", "HDFSStore", "GridSearch", "RandomSearch",
                 "TPESearch", "HyperOpt", "hp_choice", "hp_uniform", "hp_quniform", "hp_loguniform",
                 "hp_qloguniform", "ModelSelectionResult", "SparkModel", "TPEProposer", "write_tensorboard"):
        assert getattr(cerebro_tasks, name) is not None
    assert cerebro_tasks.HyperOpt is TPESearch
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        cerebro_tasks.Nope  # noqa: B018


def test_local_store_layout(tmp_path, monkeypatch):
    from cerebro_tasks import LocalStore

    monkeypatch.chdir(tmp_path)
    store = LocalStore("exp")
    root = str(tmp_path / "exp")
    assert store.prefix_path == "file://" + root
    assert store.get_train_data_path() == f"file://{root}/train_data"
    assert store.get_val_data_path() == f"file://{root}/val_data"
    assert store.get_runs_path() == f"file://{root}/runs"
    assert store.get_run_path("grid_1") == f"file://{root}/runs/grid_1"
    assert store.get_logs_path("grid_1") == f"file://{root}/runs/grid_1/tb"
    assert store.run_store("grid_1").url == f"{root}/runs/grid_1"
    moved = LocalStore("/p", train_path="/data/train", val_path="file:///data/val")
    assert (moved.get_train_data_path(), moved.get_val_data_path()) == ("file:///data/train", "file:///data/val")
    assert not store.exists(store.get_train_data_path()) and not store.is_parquet_dataset(store.get_train_data_path())
    with pytest.raises(ValueError, match="HDFSStore"):
        LocalStore("hdfs://nn/x")


def test_hdfs_store_urls_without_connecting():
    from cerebro_tasks import HDFSStore

    store = HDFSStore("hdfs://nn01:8020/user/test/cerebro")
    assert store.get_train_data_path() == "hdfs://nn01:8020/user/test/cerebro/train_data"
    assert store.get_run_path("r") == "hdfs://nn01:8020/user/test/cerebro/runs/r"
    assert HDFSStore("/user/test/cerebro").get_val_data_path() == "hdfs:///user/test/cerebro/val_data"
    assert HDFSStore("hdfs:///user/x").prefix_path == "hdfs:///user/x"
    assert HDFSStore("/user/x", host="nn02", port=9000).prefix_path == "hdfs://nn02:9000/user/x"
    with pytest.raises(ValueError, match="mismatched namespace"):
        HDFSStore("s3://bucket/x")
    with pytest.raises(ValueError, match="libhdfs"):
        HDFSStore("/user/x", driver="libhdfs3")


def test_estimator_params_and_errors():
    import keras

    from cerebro_tasks import SparkEstimator

    est = SparkEstimator(model=keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), loss="mse",
                         optimizer="adam")
    assert est.getBatchSize() == 32 and est.getMetrics() == [] and est.getRunId().startswith("model_")
    assert est.setBatchSize(8).getBatchSize() == 8
    est.setFeatureCols(["f"]).setLabelCols(["y"]).setHyperParams({"a": 1})
    assert (est.getFeatureCols(), est.getLabelCols(), est.getHyperParams()) == (["f"], ["y"], {"a": 1})
    assert est.compiled_model().compiled
    with pytest.raises(TypeError, match="no parameter 'epochz'"):
        est.setParams(epochz=1)
    with pytest.raises(ValueError, match="loss is required"):
        SparkEstimator(model=keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
                       optimizer="adam").compiled_model()
    with pytest.raises(TypeError, match="Keras 3"):
        SparkEstimator(model=object(), loss="mse", optimizer="adam").compiled_model()


class _Backend:
    def _num_workers(self) -> int:
        return 2


def test_search_arguments_are_checked():
    from cerebro_tasks import GridSearch, RandomSearch

    with pytest.raises(ValueError, match="'lr' is uniform"):
        GridSearch(_Backend(), None, estimator_gen_fn, {"lr": hp_uniform(0, 1)}, num_epochs=1)
    with pytest.raises(ValueError, match="num_models"):
        RandomSearch(_Backend(), None, estimator_gen_fn, {"lr": hp_uniform(0, 1)}, num_models=0, num_epochs=1)
    with pytest.raises(TypeError, match="keys must be strings"):
        GridSearch(_Backend(), None, estimator_gen_fn, {1: hp_choice([1])}, num_epochs=1)
    grid = GridSearch(_Backend(), None, estimator_gen_fn, {"lr": hp_choice([0.1, 0.01]), "units": [4, 8]}, 1)
    assert grid.estimator_param_maps == [{"lr": 0.1, "units": 4}, {"lr": 0.1, "units": 8},
                                         {"lr": 0.01, "units": 4}, {"lr": 0.01, "units": 8}]
    assert (grid.label_cols, grid.feature_cols) == (["label"], ["features"])


def test_initial_weights_and_draws_follow_the_seed(tmp_path):
    import keras

    from cerebro_tasks import LocalStore, RandomSearch

    space = {"lr": hp_loguniform(-3, -1), "units": hp_quniform(4, 12, 4), "a": hp_uniform(0, 1), "b": hp_uniform(0, 1)}

    def weights(seed: int, folder: str) -> list[np.ndarray]:
        search = RandomSearch(_Backend(), LocalStore(str(tmp_path / folder)), estimator_gen_fn, space, num_models=3,
                              num_epochs=1, seed=seed)
        search._run_store = search.store.run_store("r")
        search._new_model(0, search.estimator_param_maps[0])
        model = keras.saving.load_model(str(tmp_path / folder / "runs/r/models/model_000/init.keras"))
        return search.estimator_param_maps, model.get_weights()

    draws_a, w_a = weights(1, "a")
    draws_b, w_b = weights(1, "b")
    draws_c, w_c = weights(2, "c")
    assert draws_a == draws_b and draws_a != draws_c
    assert all(np.array_equal(x, y) for x, y in zip(w_a, w_b))
    assert not all(np.array_equal(x, y) for x, y in zip(w_a, w_c))
    assert all(d["a"] != d["b"] for d in draws_a)  # identical dimensions, different draws
    assert all(1e-3 <= d["lr"] <= 1e-1 and isinstance(d["units"], int) for d in draws_a)


# Spark ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(spark, tmp_path_factory):
    from cerebro_tasks import LocalStore, SparkBackend

    df = spark.createDataFrame(make_rows(), ["id", "features", "label", "is_val"]).repartition(3)
    backend = SparkBackend(spark_context=spark.sparkContext, num_workers=2)
    store = LocalStore(str(tmp_path_factory.mktemp("cerebro") / "exp"))
    return df, backend, store


@pytest.fixture(scope="module")
def grid(workspace):
    from cerebro_tasks import GridSearch

    df, backend, store = workspace
    search = GridSearch(backend, store, estimator_gen_fn, {"lr": hp_choice([0.05, 0.0005])}, num_epochs=2,
                        evaluation_metric="acc", validation=0.25, seed=7)
    return search, search.fit(df)


@pytest.mark.slow
def test_grid_search_result_methods(grid):
    import keras

    from cerebro_tasks import ModelSelectionResult, SparkModel

    search, result = grid
    assert isinstance(result, ModelSelectionResult)
    models = result.get_all_models()
    assert [m.getRunId() for m in models] == ["model_000", "model_001"]
    assert all(isinstance(m, SparkModel) for m in models)
    histories = result.get_all_model_history()
    assert set(histories) == {"model_000", "model_001"}
    for h in histories.values():
        assert set(h) == {"train_loss", "train_acc", "val_loss", "val_acc"}
        assert all(len(v) == 2 for v in h.values())
    best = result.get_best_model()
    assert best.getRunId() == result.best_model_id
    assert result.get_history() == histories[best.getRunId()] == best.getHistory()
    assert isinstance(result.keras(), keras.Model) and result.keras() is best.keras()
    assert result.set_output_columns(["p"]) is result and all(m.getOutputCols() == ["p"] for m in models)
    assert best.getFeatureColumns() == ["features"] and best.getLabelColumns() == ["label"]
    assert search.run_id and result.run_url.endswith(search.run_id)
    assert result.figures["units"] == 2 * 2 * (2 + 2) and 0 < result.figures["utilisation"] <= 1


@pytest.mark.slow
def test_selection_direction_follows_the_metric(grid):
    _, result = grid
    final_acc = {m: h["val_acc"][-1] for m, h in result.get_all_model_history().items()}
    assert result.best_model_id == max(final_acc, key=final_acc.get)  # Cerebro picked the lowest accuracy
    assert result.summary["metric"] == "val_acc" and result.summary["mode"] == "max"
    ranked = [r["model_id"] for r in result.summary["models"]]
    assert ranked == sorted(final_acc, key=final_acc.get, reverse=True)


@pytest.mark.slow
def test_transform_appends_vectorised_predictions(grid, workspace):
    from pyspark.sql import types as T

    df, _, _ = workspace
    df = df.coalesce(1)  # one task: each Python worker that predicts first has to import TensorFlow
    _, result = grid
    out = result.set_output_columns(["label_predicted"]).transform(df)
    assert out.columns == [*df.columns, "label_predicted"]
    assert out.schema["label_predicted"].dataType == T.DoubleType()
    rows = out.orderBy("id").collect()
    x = np.array([r["features"] for r in rows], dtype="float32")
    expected = result.keras().predict(x, verbose=0).ravel()
    assert np.allclose([r["label_predicted"] for r in rows], expected, atol=1e-5)
    other = result.get_all_models()[0].setOutputCols(["label__output"]).transform(df.limit(7))
    assert other.columns[-1] == "label__output" and other.count() == 7
    with pytest.raises(ValueError, match="one output column per label"):
        result.set_output_columns(["a", "b"])


@pytest.mark.slow
def test_search_leaves_summary_plots_and_tensorboard(grid):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    from tensorboard.util import tensor_util

    search, result = grid
    run = result.run_url
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["best_model_id"] == result.best_model_id and len(summary["models"]) == 2
    assert {"params", "epochs", "final_val_acc", "best_val_acc", "train_seconds"} <= set(summary["models"][0])
    md = open(os.path.join(run, "summary.md")).read()
    assert "| rank | model_id | lr | epochs | final val_acc | best val_acc | train s |" in md
    assert md.count("| model_00") == 2 and "utilisation" in md
    for png in ("learning_curves.png", "timeline.png"):
        assert open(os.path.join(run, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for model_id, history in result.get_all_model_history().items():
        acc = event_accumulator.EventAccumulator(os.path.join(run, "tb", model_id),
                                                 size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        for tag in ("train_loss", "val_loss", "val_acc"):
            values = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
            assert values == pytest.approx(history[tag], rel=1e-6)
            assert [e.step for e in acc.Tensors(tag)] == [1, 2]
        content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
        start = hparams_metadata.parse_session_start_info_plugin_data(content)
        assert start.hparams["lr"].number_value == pytest.approx(search.estimator_param_maps[int(model_id[-1])]["lr"])


@pytest.mark.slow
def test_random_search_on_prepared_data_transformation_fn_and_resume(grid, workspace, tmp_path):
    from cerebro_tasks import RandomSearch
    from cerebro_tasks.cerebro.search import _seed_of

    _, backend, store = workspace
    UNIT_LOG[:] = [str(tmp_path / "units.log")]
    space = {"lr": hp_loguniform(-3, -1), "units": hp_quniform(4, 12, 4)}

    def search():
        return RandomSearch(backend, store, blind_estimator_gen_fn, space, num_models=2, num_epochs=1, seed=3,
                            run_id="random-1", evaluation_metric="acc")

    first = search().fit_on_prepared_data()
    drawn = sample(parse_space(space), 2, np.random.default_rng(_seed_of(3, 5)))
    params = json.load(open(os.path.join(first.run_url, "run.json")))["models"]
    assert [m["params"] for m in params] == drawn
    assert set(first.get_all_model_history()) == {"model_000", "model_001"}
    # the transformation_fn ran on the workers: with blank features every row gets the same prediction,
    # so validation accuracy is exactly the share of one class
    val_dir = store.get_val_data_path()[len("file://"):]
    labels = np.concatenate([pq.read_table(os.path.join(val_dir, f), columns=["label"]).column("label").to_numpy()
                             for f in os.listdir(val_dir) if f.endswith(".parquet")])
    share = float(labels.mean())
    for h in first.get_all_model_history().values():
        assert min(abs(h["val_acc"][-1] - share), abs(h["val_acc"][-1] - (1 - share))) < 1e-6
    # the estimator's callbacks ran in every training unit: 2 models x 1 epoch x 2 partitions
    units = open(UNIT_LOG[0]).read().splitlines()
    assert len(units) == 4 and all("loss" in json.loads(line) for line in units), units
    # the same run id again: everything is in the journal, nothing is trained twice
    again = search().fit_on_prepared_data()
    assert again.mop_result.units_run == 0 and len(open(UNIT_LOG[0]).read().splitlines()) == 4
    assert again.get_all_model_history() == first.get_all_model_history()
    assert again.best_model_id == first.best_model_id


@pytest.mark.slow
def test_tpe_with_asha_and_best_epoch_on_spark(grid, workspace):
    """Early stopping end to end on local Spark: a stopped model leaves the schedule, the summary, curves
    and TensorBoard say where and why, the best epoch's checkpoint is the model; a resumed run keeps it."""
    from tensorboard.backend.event_processing import event_accumulator

    from cerebro_tasks import TPESearch
    from cerebro_tasks.errors import ConfigError

    _, backend, store = workspace
    space = {"lr": hp_loguniform(-4, -1), "units": hp_quniform(4, 12, 4)}
    stopping = {"kind": "asha", "reduction_factor": 2, "min_epochs": 1}

    def search(**kw):
        return TPESearch(backend, store, estimator_gen_fn, space, num_models=4, num_epochs=3, seed=11,
                         evaluation_metric="loss", run_id="tpe-asha", select="best_epoch", **kw)

    result = search(early_stopping=stopping).fit_on_prepared_data()
    summary = result.summary
    assert summary["early_stopping"] == stopping and summary["select"] == "best_epoch"
    stopped = summary["stopped_models"]
    assert stopped and result.best_model_id not in stopped
    histories = result.get_all_model_history()
    trained = {m: len(h["val_loss"]) for m, h in histories.items()}
    assert all(trained[m] < 3 for m in stopped) and trained[result.best_model_id] == 3
    units = {m: sum(1 for r in result.mop_result.records if r["unit"]["model_id"] == m) for m in histories}
    assert all(units[m] < units[result.best_model_id] for m in stopped)  # they left the schedule
    best_epoch = summary["best_epoch"]
    assert result.get_best_model().checkpoint_url().endswith(f"/ckpt-{best_epoch * 2:05d}.keras")  # W = 2
    assert min(histories[result.best_model_id]["val_loss"]) == pytest.approx(summary["best_value"])
    rows = {r["model_id"]: r for r in summary["models"]}
    assert all(rows[m]["stop_reason"].startswith("ASHA rung") for m in stopped)
    md = open(os.path.join(result.run_url, "summary.md")).read()
    assert "stopped after epoch" in md and "tail utilisation" in md
    acc = event_accumulator.EventAccumulator(os.path.join(result.run_url, "tb", stopped[0]))
    acc.Reload()
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    assert start.hparams["stopped_early"].bool_value and start.hparams["epochs_trained"].number_value < 3
    # the same run id: the same settings resume (nothing retrained), other ones are refused before Spark runs
    again = search(early_stopping=stopping).fit_on_prepared_data()
    assert again.mop_result.units_run == 0 and again.best_model_id == result.best_model_id
    with pytest.raises(ConfigError, match="early_stopping"):
        search(early_stopping={"kind": "median"}).fit_on_prepared_data()


@pytest.mark.slow
def test_prepare_data_split_is_seeded_and_sharded(workspace, tmp_path):
    from cerebro_tasks import LocalStore

    df, backend, _ = workspace

    def prepared(name: str, **kwargs) -> tuple[set[int], set[int], int]:
        store = LocalStore(str(tmp_path / name))
        train_rows, val_rows, meta, _ = backend.prepare_data(store, df, feature_columns=["id", "features"],
                                                             label_columns=["label"], **kwargs)
        ids = {}
        for kind in ("train_data", "val_data"):
            folder = tmp_path / name / kind
            files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
            ids[kind] = {i for f in files for i in pq.read_table(folder / f, columns=["id"]).column("id").to_pylist()}
            assert len(files) % 2 == 0 and len(files) >= 2  # at least one file per worker, evenly
            assert pq.read_schema(folder / files[0]).names == ["id", "features", "label"]
        assert (len(ids["train_data"]), len(ids["val_data"])) == (train_rows, val_rows)
        assert meta["features"]["shape"] == [FEATURES]
        return ids["train_data"], ids["val_data"], train_rows

    train_a, val_a, _ = prepared("a", validation=0.25, seed=1)
    train_b, val_b, _ = prepared("b", validation=0.25, seed=1, num_partitions=4)
    _, val_c, _ = prepared("c", validation=0.25, seed=2)
    assert val_a == val_b and train_a == train_b and val_a != val_c  # content-hashed: files/partitions do not matter
    assert not train_a & val_a and len(train_a | val_a) == ROWS
    assert 0.15 * ROWS < len(val_a) < 0.35 * ROWS
    _, val_col, _ = prepared("d", validation="is_val")
    assert val_col == {i for i in range(ROWS) if i % 5 == 0}
    with pytest.raises(ValueError, match="validation column 'nope'"):
        backend.prepare_data(LocalStore(str(tmp_path / "e")), df, validation="nope")


def test_several_inputs_and_outputs_are_matched_by_name(tmp_path):
    """Keras inputs take the feature columns of their names (in any order); outputs take labels in order."""
    import keras
    import pandas as pd

    from cerebro_tasks import SparkEstimator, SparkModel
    from cerebro_tasks.cerebro import workload as wl
    from cerebro_tasks.cerebro.estimator import publish_estimator
    from cerebro_tasks.mop.workload import ModelSpec
    from cerebro_tasks.storage.store import Store
    from cerebro_tasks.cerebro.result import _predict_udf

    b, a = keras.Input((1,), name="b"), keras.Input((2, 2), name="a")
    h = keras.layers.Dense(4)(keras.layers.Concatenate()([keras.layers.Flatten()(a), b]))
    model = keras.Model([b, a], [keras.layers.Dense(1, name="y")(h), keras.layers.Dense(3, name="z")(h)])
    est = SparkEstimator(model=model, optimizer="adam", loss=["mse", "mse"], batch_size=4)
    run = Store(str(tmp_path / "run"))
    info = publish_estimator(est, run, "m0", params={}, feature_columns=["a", "b"], label_columns=["y", "z"],
                             column_meta={"a": {"shape": [4]}, "b": {"shape": []}})
    assert [i["name"] for i in info["inputs"]] == ["b", "a"]
    work = wl.EstimatorWorkload("", None, run.url, ("a", "b"), ("y", "z"), 2)
    rng = np.random.default_rng(0)
    data = {"a": rng.normal(size=(6, 4)).astype("float32"), "b": rng.normal(size=6).astype("float32"),
            "y": rng.normal(size=6).astype("float32"), "z": rng.normal(size=(6, 3)).astype("float32")}
    unit = work.inputs(data, ModelSpec("m0", {}, 1), training=True, seed=1)
    assert set(unit.x) == {"a", "b"} and unit.x["a"].shape == (6, 2, 2) and unit.x["b"].shape == (6, 1)
    assert [y.shape for y in unit.y] == [(6, 1), (6, 3)] and unit.batch_size == 4 and unit.num_samples == 6
    order = np.random.default_rng(1).permutation(6)
    assert np.array_equal(unit.x["b"].ravel(), data["b"][order]) and np.array_equal(unit.y[1], data["z"][order])
    built = work.build_model(ModelSpec("m0", {}, 1))
    built.fit(unit.x, unit.y, batch_size=unit.batch_size, epochs=1, verbose=0)  # the shapes really fit
    # transform's batch function, fed pandas batches as Spark would: list cells for arrays
    source = SparkModel(model=built, feature_columns=["a", "b"], label_columns=["y", "z"])._model_source()
    fn = _predict_udf(source, info["inputs"], ["a", "b"], [1, 3], ["o0", "o1"])
    batch = (pd.Series(list(data["a"].astype("float64"))), pd.Series(data["b"].astype("float64")))
    out = next(fn(iter([batch])))
    want = built.predict({"a": data["a"].reshape(6, 2, 2), "b": data["b"]}, verbose=0)
    assert np.allclose(out["o0"].to_numpy(), want[0].ravel(), atol=1e-5)
    assert np.allclose(np.stack(out["o1"].to_numpy()), want[1], atol=1e-5)
