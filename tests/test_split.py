"""Subject-level split: hashing, stability as subjects arrive, balanced partitions, the written layout."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from cerebro_tasks.deeppostures import petastorm_io as pio
from cerebro_tasks.deeppostures import split as sp


# ------------------------------------------------------------------------------------------------
# pure: which split, which partition
# ------------------------------------------------------------------------------------------------


def test_split_is_deterministic_and_stable_when_subjects_arrive():
    first = [f"P{i:04d}" for i in range(300)]
    before = sp.assign_splits(first, seed=11)
    assert before == sp.assign_splits(list(reversed(first)), seed=11)  # order of the list is irrelevant
    after = sp.assign_splits(first + [f"Q{i:04d}" for i in range(200)], seed=11)
    for name in sp.SPLITS:
        assert set(before[name]) <= set(after[name]), name  # nobody moves
    assert 0.6 < len(after["train"]) / 500 < 0.8  # 70/30 in expectation
    assert after["test"] == []
    assert sp.assign_splits(first, seed=12) != before  # the seed matters


def test_raising_a_fraction_only_moves_subjects_out_of_training():
    subjects = [f"P{i:04d}" for i in range(300)]
    small = sp.assign_splits(subjects, seed=5, val_fraction=0.2)
    large = sp.assign_splits(subjects, seed=5, val_fraction=0.3, test_fraction=0.1)
    assert set(large["train"]) <= set(small["train"])
    assert set(small["val"]) | set(small["test"]) <= set(large["val"]) | set(large["test"])
    assert 0.03 < len(large["test"]) / 300 < 0.2


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match=r"val_fraction: expected a fraction in \[0, 1\), found 1.2"):
        sp.assign_split("A", 0, val_fraction=1.2)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction: expected < 1"):
        sp.assign_split("A", 0, val_fraction=0.6, test_fraction=0.5)


def test_balance_partitions_is_greedy_largest_first_and_whole_subjects():
    weights = {"a": 10, "b": 9, "c": 8, "d": 3, "e": 2, "f": 2}
    assert sp.balance_partitions(weights, 2) == [["a", "d", "e", "f"], ["b", "c"]]  # 17 / 17
    assert sp.balance_partitions(weights, 8)[-2:] == [[], []]  # fewer subjects than workers
    rng = np.random.default_rng(0)
    many = {f"S{i}": int(rng.integers(20_000, 60_000)) for i in range(400)}
    parts = sp.balance_partitions(many, 8)
    assert sorted(s for p in parts for s in p) == sorted(many)
    loads = [sum(many[s] for s in p) for p in parts]
    assert max(loads) / np.mean(loads) - 1 < 0.005
    with pytest.raises(ValueError, match="workers: expected at least 1, found 0"):
        sp.balance_partitions(many, 0)


# ------------------------------------------------------------------------------------------------
# written split
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(spark, h5_tree, tmp_path_factory):
    from cerebro_tasks.deeppostures.convert import convert

    url = str(tmp_path_factory.mktemp("split_ds") / "windows")
    convert(h5_tree, url, spark=spark)
    return url


def _seed_with_both_splits(subjects, val_fraction=0.3):
    return next(s for s in range(100) if all(sp.assign_splits(subjects, s, val_fraction)[n] for n in ("train", "val")))


@pytest.mark.slow
def test_write_split_layout_partitions_and_report(spark, dataset, tmp_path):
    full = pio.read_windows(dataset)
    subjects = sorted(set(full["id"]))
    seed = _seed_with_both_splits(subjects)
    prepared = str(tmp_path / "prepared")
    report = sp.write_split(dataset, prepared, workers=2, seed=seed, spark=spark)
    assert report["reused"] is False
    with open(os.path.join(prepared, "split.json")) as f:
        assert json.load(f)["subjects"] == report["subjects"]
    assert sorted(report["subjects"]["train"] + report["subjects"]["val"]) == subjects
    seen: dict[str, str] = {}
    for name in ("train", "val"):
        total = 0
        for p in range(2):
            url = sp.partition_url(prepared, name, p)
            assert os.path.isdir(os.path.join(prepared, name, f"part-{p}"))
            got = pio.read_windows(url)
            part = report["partitions"][name][p]
            assert sorted(set(got["id"])) == part["subjects"]
            assert len(got["time"]) == part["windows"]
            usable = (got["sleeping"] == 0) & (got["non_wear"] == 0) & (got["label"] >= 0)
            assert part["usable_labels"] == {str(k): int(c) for k, c in zip(*np.unique(got["label"][usable],
                                                                                    return_counts=True))}
            for s in part["subjects"]:  # whole subjects, in one place only, rows identical
                assert s not in seen
                seen[s] = f"{name}/{p}"
                mine = got["id"] == s
                theirs = full["id"] == s
                for key in pio.FIELDS:
                    assert np.array_equal(got[key][mine], full[key][theirs]), (s, key)
            total += len(got["time"])
        assert total == report["windows"][name]
        loads = [p["usable_windows"] for p in report["partitions"][name]]
        if min(loads) > 0:
            assert report["imbalance"][name] == pytest.approx(max(loads) / np.mean(loads) - 1)
    assert sorted(seen) == subjects
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left behind

    again = sp.write_split(dataset, prepared, workers=2, seed=seed, spark=spark)
    assert again["reused"] is True and again["subjects"] == report["subjects"]

    # training's class weights come from these counts, and equal a count over the data itself,
    # which is what a split written before the counts were recorded still gets
    from cerebro_tasks.jobs import train

    recorded = train._recorded_label_counts(prepared, 2)
    assert recorded == {int(k): c for k, c in sum((Counter(p["usable_labels"]) for p in report["partitions"]["train"]),
                                                  Counter()).items()}
    weights = train.class_weights(spark, prepared, 2)
    with open(os.path.join(prepared, "split.json")) as f:
        older = json.load(f)
    for part in older["partitions"]["train"]:
        del part["usable_labels"]
    with open(os.path.join(prepared, "split.json"), "w") as f:
        json.dump(older, f)
    assert train._recorded_label_counts(prepared, 2) is None
    assert dict(train.class_weights(spark, prepared, 2)) == pytest.approx(dict(weights))


@pytest.mark.slow
def test_split_stays_stable_when_subjects_are_added(spark, h5_tree, tmp_path):
    from cerebro_tasks.deeppostures.convert import convert
    from cerebro_tasks.deeppostures.synth import synthesize

    root = str(tmp_path / "study")
    shutil.copytree(h5_tree, root)
    url = str(tmp_path / "windows")
    convert(root, url, spark=spark)
    seed = _seed_with_both_splits(sorted(os.listdir(root)))
    first = sp.write_split(url, str(tmp_path / "prepared"), workers=2, seed=seed, spark=spark)

    synthesize(str(tmp_path / "more"), subjects=7, days=2, seed=7, windows_per_day=120)
    for sid in ("S0005", "S0006", "S0007"):
        shutil.copytree(str(tmp_path / "more" / sid), os.path.join(root, sid))
    convert(root, url, spark=spark)
    second = sp.write_split(url, str(tmp_path / "prepared"), workers=2, seed=seed, spark=spark)
    assert second["reused"] is False  # the dataset changed, so the split is rewritten
    for name in ("train", "val"):
        assert set(first["subjects"][name]) <= set(second["subjects"][name])
    on_disk = set(pio.read_windows(sp.partition_url(str(tmp_path / "prepared"), "train", 0), columns=["id"])["id"])
    on_disk |= set(pio.read_windows(sp.partition_url(str(tmp_path / "prepared"), "train", 1), columns=["id"])["id"])
    assert on_disk == set(second["subjects"]["train"])


@pytest.mark.slow
def test_empty_validation_split_is_an_error(spark, dataset, tmp_path):
    subjects = sorted(set(pio.read_windows(dataset, columns=["id"])["id"]))
    seed = next(s for s in range(100) if not sp.assign_splits(subjects, s)["val"])
    with pytest.raises(ValueError, match="split 'val': expected at least one subject, found none among 4"):
        sp.write_split(dataset, str(tmp_path / "prepared"), workers=2, seed=seed, spark=spark)
    assert not os.path.exists(tmp_path / "prepared")


def _write_published_example_dataset(spark, h5_root: str, url: str) -> None:
    """The published cerebro-spark DeepPostures example's writer: its schema, its Spark path."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.etl.dataset_metadata import materialize_dataset
    from petastorm.unischema import Unischema, UnischemaField, dict_to_spark_row
    from pyspark.sql.types import IntegerType, LongType, StringType

    from cerebro_tasks.deeppostures import h5format

    schema = Unischema("schema", [
        UnischemaField("id", np.string_, (), ScalarCodec(StringType()), False),
        UnischemaField("time", np.int64, (), ScalarCodec(LongType()), False),
        UnischemaField("data", np.float32, (100, 3), NdarrayCodec(), False),
        UnischemaField("non_wear", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("sleeping", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("label", np.int32, (), ScalarCodec(IntegerType()), False),
    ])
    rows = []
    for subject, date, path in h5format.list_h5_files(h5_root):
        day = h5format.read_h5(path, subject, date)
        for i in range(day.num_windows):
            rows.append({"id": subject, "time": int(day.time[i]), "data": day.data[i].astype(np.float32),
                         "non_wear": int(day.non_wear[i]), "sleeping": int(day.sleeping[i]),
                         "label": int(day.label[i])})
    with materialize_dataset(spark, url, schema, 1):
        rdd = spark.sparkContext.parallelize(rows, 3).map(lambda x: dict_to_spark_row(schema, x))
        df = spark.createDataFrame(rdd, schema=schema.as_spark_schema())
        df.orderBy("id", "time").coalesce(2).write.mode("overwrite").parquet(url)


@pytest.mark.slow
def test_published_example_dataset_reads_and_splits(spark, h5_tree, dataset, tmp_path):
    url = "file://" + str(tmp_path / "published")
    _write_published_example_dataset(spark, h5_tree, url)
    ours = pio.read_windows(dataset)
    theirs = pio.read_windows(url)  # the training input path, on the example's storage
    for key in pio.FIELDS:
        assert np.array_equal(theirs[key], ours[key]), key
    subjects = sorted(set(ours["id"]))
    seed = _seed_with_both_splits(subjects)
    prepared = str(tmp_path / "prepared")
    report = sp.write_split(url, prepared, workers=2, seed=seed, spark=spark)
    same = sp.write_split(dataset, str(tmp_path / "prepared_ours"), workers=2, seed=seed, spark=spark)
    assert report["subjects"] == same["subjects"]
    assert report["partitions"] == same["partitions"]
    for p in range(2):
        a = pio.read_windows(sp.partition_url(prepared, "train", p))
        b = pio.read_windows(sp.partition_url(str(tmp_path / "prepared_ours"), "train", p))
        for key in pio.FIELDS:
            assert np.array_equal(a[key], b[key]), key
