"""What a run for a logical date does (cerebro_tasks/jobs/plan.py), and LATEST only moving forward.

The decisions read small files only: the conversion manifest (when each file arrived), the
prediction ledger and the exports' metadata. These tests write those files in their real format
and check each decision; the real-scheduler test (test_airflow_scheduler.py) runs them end to end.
"""

from __future__ import annotations

import json
import os

import pytest

from cerebro_tasks.deeppostures.arrivals import arrived_subjects, files_as_of, to_ns
from cerebro_tasks.deeppostures.export import LATEST, model_in_force, move_latest
from cerebro_tasks.errors import ConfigError
from cerebro_tasks.jobs.plan import plan_run

DAY1, DAY2, DAY3 = "2024-03-01T00:00:00+00:00", "2024-03-02T00:00:00+00:00", "2024-03-03T00:00:00+00:00"


def _manifest(folder, arrivals: dict[str, str]) -> str:
    """A dataset whose manifest says subject -> the instant its one file arrived."""
    files = {f"{s}/2024-02-01.h5": {"subject": s, "date": "2024-02-01", "mtime_ns": to_ns(at), "size": 1,
                                    "part": f"part-{s}.parquet", "windows": 10, "usable": 10}
             for s, at in arrivals.items()}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "_cerebro_manifest.json"), "w") as f:
        json.dump({"format": "cerebro-windows/1", "version": 1, "files": files}, f)
    return str(folder)


def _export(root, run_id: str, as_of: str) -> None:
    os.makedirs(os.path.join(root, run_id), exist_ok=True)
    with open(os.path.join(root, run_id, "metadata.json"), "w") as f:
        json.dump({"run_id": run_id, "as_of": as_of}, f)


@pytest.fixture
def paths(tmp_path):
    dataset = _manifest(tmp_path / "dataset", {"A": "2024-02-29T10:00:00+00:00", "B": "2024-03-01T10:00:00+00:00",
                                               "C": "2024-03-02T10:00:00+00:00"})
    return {"dataset_url": dataset, "export_url": str(tmp_path / "exports"),
            "predictions_url": str(tmp_path / "predictions")}


def test_arrivals_are_the_recorded_mtimes():
    files = {"x": {"subject": "A", "mtime_ns": to_ns(DAY1)}, "y": {"subject": "B", "mtime_ns": to_ns(DAY2)}}
    assert list(files_as_of(files, to_ns(DAY2))) == ["x"]  # the interval's end is exclusive
    assert arrived_subjects(files, to_ns(DAY1), to_ns(DAY2)) == ["A"]
    assert to_ns("2024-03-01T01:00:00+01:00") == to_ns(DAY1) == to_ns("2024-03-01T00:00:00")


def test_backfill_dates_predict_their_arrivals_and_retrain_on_new_data(paths):
    first = plan_run(paths, run_type="backfill", interval=(DAY1, DAY2))
    assert first["retrain"] and first["branches"] == ["split", "predict"]
    assert (first["which"], first["since"], first["data_as_of"]) == ("arrived", DAY1, DAY2)
    assert first["arrived"] == ["B"] and first["subjects"] == 2  # C had not arrived yet
    _export(paths["export_url"], "backfill__2024-03-02", DAY2)
    # nothing arrived on 3 March: no training, no predictions: the run costs nothing
    quiet = plan_run(paths, run_type="scheduled", interval=(DAY3, "2024-03-04T00:00:00+00:00"))
    assert quiet["branches"] == [] and not quiet["retrain"]


def test_retrain_never_predicts_with_the_model_in_force(paths):
    _export(paths["export_url"], "r1", DAY1)
    _export(paths["export_url"], "r4", "2024-03-04T00:00:00+00:00")  # later than the run: not in force for it
    plan = plan_run({**paths, "retrain": "never"}, run_type="backfill", interval=(DAY2, DAY3))
    assert plan["branches"] == ["predict"] and plan["arrived"] == ["C"]
    assert plan["export_url"].endswith("/exports/r1") and plan["model_name"] == "deeppostures-r1"
    always = plan_run({**paths, "retrain": "always"}, run_type="backfill", interval=(DAY3, "2024-03-04T00:00:00+00:00"))
    assert always["branches"] == ["split"] and always["export_url"] is None  # trains; nobody to predict


def test_manual_runs_use_all_data_and_the_prediction_ledger(paths):
    os.makedirs(paths["predictions_url"])
    with open(os.path.join(paths["predictions_url"], "_predicted_subjects.json"), "w") as f:
        json.dump({"subjects": {"A": {"model": "m"}, "B": {"model": "m"}}}, f)
    plan = plan_run(paths, run_type="manual", interval=(DAY1, DAY2))
    assert (plan["which"], plan["data_as_of"], plan["since"]) == ("new", None, None)
    assert plan["arrived"] == ["C"] and plan["retrain"] and plan["as_of"] == DAY2
    every = plan_run({**paths, "predict_all": True, "retrain": "always"}, run_type="asset_triggered",
                     interval=(None, None), now=__import__("datetime").datetime(2025, 1, 1))
    assert every["which"] == "all" and every["to_predict"] == 3 and every["as_of"].startswith("2025-01-01T00:00:00")


def test_what_cannot_work_fails_naming_the_param(paths):
    with pytest.raises(ConfigError, match="retrain='never': 1 subject.*no model in force as of 2024-03-02"):
        plan_run({**paths, "retrain": "never"}, run_type="backfill", interval=(DAY1, DAY2))
    with pytest.raises(ConfigError, match="retrain: no data to train on as of 2024-02-01"):
        plan_run({**paths, "retrain": "always"}, run_type="backfill", interval=("2024-01-31T00:00:00+00:00",
                                                                               "2024-02-01T00:00:00+00:00"))
    with pytest.raises(ConfigError, match="retrain: expected one of"):
        plan_run({**paths, "retrain": "sometimes"}, run_type="backfill", interval=(DAY1, DAY2))


def test_latest_only_moves_forward(tmp_path):
    root = str(tmp_path)
    _export(root, "day2", DAY2)
    _export(root, "day1", DAY1)
    _export(root, "day3", DAY3)
    assert move_latest(root, "day2")
    assert not move_latest(root, "day1")  # a backfill of an older date finishing late
    assert open(os.path.join(root, LATEST)).read().strip() == "day2"
    assert move_latest(root, "day3") and open(os.path.join(root, LATEST)).read().strip() == "day3"
    assert model_in_force(root, "2024-03-02T12:00:00+00:00").endswith("/day2")
    assert model_in_force(root, DAY3).endswith("/day3")  # trained on data as of the same instant
    assert model_in_force(root, "2024-02-01T00:00:00+00:00") is None
    with pytest.raises(ValueError, match="expected an export with metadata.json"):
        move_latest(root, "nothing-here")
