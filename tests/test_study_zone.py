"""A study as DeepPostures pre-processed it in Los Angeles, Sydney or UTC: conversion, prediction
and a CHAP-style ensemble, through the real Spark jobs.

The same study written as if pre-processed in three zones must give the same windows, segments
and CSV rows (only ``time`` differs, by the zone's offset); the wrong zone is one clear error.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cerebro_tasks.deeppostures import petastorm_io as pio  # noqa: E402
from cerebro_tasks.deeppostures.convert import ConversionError, convert, dataset_study  # noqa: E402
from cerebro_tasks.deeppostures.sequences import segment_ids  # noqa: E402
from cerebro_tasks.deeppostures.synth import synthesize  # noqa: E402

pytestmark = pytest.mark.slow

ZONES = {"utc": "UTC", "la": "America/Los_Angeles", "sydney": "Australia/Sydney"}
# 2024-03-04/05 wall clock: PST (UTC-8) in Los Angeles, AEDT (UTC+11) in Sydney
OFFSETS = {"utc": 0, "la": -8 * 3600, "sydney": 11 * 3600}


@pytest.fixture(scope="module")
def converted(spark, tmp_path_factory) -> dict[str, tuple[str, dict]]:
    root = tmp_path_factory.mktemp("zones")
    out = {}
    for name, zone in ZONES.items():
        synthesize(str(root / name / "h5"), subjects=3, days=2, seed=11, windows_per_day=720, timezone=zone)
        url = str(root / name / "windows")
        out[name] = (url, convert(str(root / name / "h5"), url, spark=spark, timezone=zone))
    return out


def test_same_windows_and_segments_in_every_zone(converted) -> None:
    utc = pio.read_windows(converted["utc"][0])
    for name in ("la", "sydney"):
        url, report = converted[name]
        assert report["quarantine"] == [] and report["files"]["converted"] == 6 and report["timezone"] == ZONES[name]
        assert dataset_study(url)["timezone"] == ZONES[name]
        got = pio.read_windows(url)
        for key in ("id", "data", "non_wear", "sleeping", "label"):
            np.testing.assert_array_equal(got[key], utc[key])
        np.testing.assert_array_equal(got["time"] - utc["time"], -OFFSETS[name])
        for training in (True, False):
            np.testing.assert_array_equal(segment_ids(got, training=training), segment_ids(utc, training=training))


def test_the_wrong_zone_is_one_error_naming_it_and_the_zone_that_fits(spark, converted, tmp_path) -> None:
    h5 = os.path.join(os.path.dirname(converted["la"][0]), "h5")
    url = str(tmp_path / "windows")
    with pytest.raises(ConversionError) as err:
        convert(h5, url, spark=spark)  # UTC, the default
    text = str(err.value)
    assert "time zone 'UTC' does not fit this study" in text and "The zone that fits: America/Los_Angeles" in text
    assert "S0001/2024-03-0" in text and "Nothing was published" in text
    assert not os.path.exists(os.path.join(url, pio.MANIFEST_NAME))
    # the dataset keeps its zone: another one is refused, none given reuses it
    la_url = converted["la"][0]
    with pytest.raises(ConversionError, match="converted with the time zone 'America/Los_Angeles', asked for 'UTC'"):
        convert(h5, la_url, spark=spark, timezone="UTC")
    again = convert(h5, la_url, spark=spark)
    assert again["timezone"] == "America/Los_Angeles" and again["files"]["skipped"] == 6


def test_daylight_saving_days_kept_or_quarantined_by_name(spark, tmp_path) -> None:
    h5 = str(tmp_path / "h5")
    # 4 hours per file from midnight: spans 02:00 and 03:00 of the second day
    synthesize(h5, subjects=1, days=2, seed=3, windows_per_day=1440, timezone="America/Los_Angeles",
               start_date="2024-11-02", subject_prefix="A")
    synthesize(h5, subjects=1, days=2, seed=3, windows_per_day=1440, timezone="America/Los_Angeles",
               start_date="2024-03-09", subject_prefix="B")
    report = convert(h5, str(tmp_path / "windows"), spark=spark, timezone="America/Los_Angeles")
    assert report["files"]["converted"] == 3
    [autumn] = report["dst_changes"]
    assert autumn["path"].endswith("A0001/2024-11-03.h5") and autumn["window"] == 720 and autumn["change_s"] == -3600
    [spring] = report["quarantine"]
    assert spring["path"].endswith("B0001/2024-03-10.h5") and spring["field"] == "time"
    assert "windows 720-1079" in spring["problem"] and "America/Los_Angeles skips" in spring["problem"]
    got = pio.read_windows(str(tmp_path / "windows"), subjects=["A0001"])
    assert len(got["time"]) == 2 * 1440 and (np.diff(got["time"]) > 0).all()  # in file order, none moved


# ------------------------------------------------------------------------------------------------
# predictions: same CSV rows in every zone; an ensemble of three voting
# ------------------------------------------------------------------------------------------------


def _fake_run(root, models: list[tuple[str, float, float]], workers: int = 2, epochs: int = 1) -> str:
    """A finished run's files as the trainer leaves them, for models ``(id, window minutes,
    val_loss)`` (checkpoints compiled, as workers save them), without paying for training."""
    from cerebro_tasks.deeppostures.workload import build_model
    from cerebro_tasks.storage import layout
    from cerebro_tasks.storage.store import Store

    run = Store(str(root / "runs" / "r1"))
    ranked = sorted(models, key=lambda m: m[2])
    history = {}
    for i, (model_id, minutes, loss) in enumerate(models):
        model = build_model({"window_minutes": minutes, "amp_factor": 0.25}, seed=100 + i)
        path = run.path(*layout.checkpoint_name(model_id, epochs * workers))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        model.save(path)
        history[model_id] = {"val_loss": [loss]}
    best = ranked[0]
    run.write_json({"config": {"prepared_url": str(root / "prepared")}}, layout.CONFIG)
    run.write_json(history, layout.HISTORY)
    run.write_json({"metric": "val_loss", "num_workers": workers, "failed_models": [],
                    "models": [{"rank": r + 1, "model_id": m, "params": {"window_minutes": w}, "epochs": epochs,
                                "val_loss": v} for r, (m, w, v) in enumerate(ranked)]}, layout.SUMMARY_JSON)
    run.write_json({"run_id": "r1", "best_model_id": best[0], "best_params": {"window_minutes": best[1]},
                    "metric": "val_loss", "best_value": best[2],
                    "best_checkpoint": run.url_of(*layout.checkpoint_name(best[0], epochs * workers))}, layout.RESULT)
    return run.url_of()


def _csvs(folder: str) -> dict[str, str]:
    return {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))
            if name.endswith(".csv")}


def test_predictions_are_the_same_rows_in_every_zone_and_the_ensemble_votes(spark, converted, tmp_path) -> None:
    import keras

    from cerebro_tasks.deeppostures.chap import predict_subject_ensemble
    from cerebro_tasks.deeppostures.export import export_best
    from cerebro_tasks.jobs.predict import predict

    # window minutes 0.5 / 1 / 0.5 -> T = 3 / 6 / 3; ranked by val_loss: m001, m002, m000
    run_url = _fake_run(tmp_path, [("m000", 0.5, 0.9), ("m001", 1.0, 0.5), ("m002", 0.5, 0.7), ("m003", 1.0, 1.2)])
    single = export_best(run_url, str(tmp_path / "export1"))
    three = export_best(run_url, str(tmp_path / "export3"), top_k=3)
    assert single["ensemble"] == ["m001"] and three["ensemble"] == ["m001", "m002", "m000"]
    meta = json.load(open(tmp_path / "export3" / "r1" / "metadata.json"))
    assert [(m["model_id"], m["window_size"]) for m in meta["ensemble"]["members"]] == [("m001", 6), ("m002", 3),
                                                                                          ("m000", 3)]
    with pytest.raises(ValueError, match="odd"):
        export_best(run_url, str(tmp_path / "export2"), top_k=2)

    outputs = {}
    for name in ("utc", "la"):  # Sydney's windows equal UTC's (above): the CSV path is the same
        preds = str(tmp_path / f"predictions-{name}")
        summary = predict(spark, dataset_url=converted[name][0], model_url=three["export_url"], predictions_url=preds,
                          model_name="chap", include_label=True)
        assert summary["models_voting"] == 3 and summary["timezone"] == ZONES[name] and summary["subjects"] == 3
        outputs[name] = _csvs(os.path.join(preds, "chap"))
    assert outputs["utc"] == outputs["la"]  # byte for byte
    first = outputs["utc"]["S0001.csv"].splitlines()
    assert first[0] == "segment,timestamp,label,prediction" and first[1].split(",")[1] == "2024-03-04 22:00:00"

    # the job's vote is the chap vote of the three exported files, loaded with plain Keras
    folder = tmp_path / "export3" / "r1"
    members = [keras.saving.load_model(str(folder / m["file"]), compile=False) for m in meta["ensemble"]["members"]]
    table = pio.read_windows(converted["la"][0], subjects=["S0001"])
    expected = predict_subject_ensemble(table, [(m.predict_on_batch, int(m.input_shape[1])) for m in members],
                                        include_label=True, timezone="America/Los_Angeles")
    assert outputs["la"]["S0001.csv"] == expected.to_csv(index=False, lineterminator="\n")

    # DeepPostures' options: no segment column, class names from a label map
    preds = str(tmp_path / "predictions-options")
    predict(spark, dataset_url=converted["la"][0], model_url=single["export_url"], predictions_url=preds,
            model_name="one", include_segment=False, label_map={"sit": 0, "upright": 1}, subjects=["S0002"])
    lines = open(os.path.join(preds, "one", "S0002.csv")).read().splitlines()
    assert lines[0] == "timestamp,prediction" and {line.split(",")[1] for line in lines[1:]} <= {"sit", "upright"}
    with pytest.raises(ValueError, match="names 3 classes, the model .* outputs 2"):
        predict(spark, dataset_url=converted["la"][0], model_url=single["export_url"], predictions_url=preds,
                model_name="bad", label_map={"a": 0, "b": 1, "c": 2})
