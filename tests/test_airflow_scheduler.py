"""The DAG through Airflow's real scheduler: scheduled, backfill and manual runs, as in production.

Not `airflow dags test`: an Airflow 3 deployment (scheduler with the LocalExecutor, DAG
processor, API server; SQLite; tests/support/airflow_deployment.py) runs the model-selection DAG
on the embedded default search with real spark-submit jobs. Subjects S0001-S0004 arrive on
1 March and S0005-S0006 on 2 March (their files' mtimes), then:

- the DAG is unpaused at creation, so the scheduler makes today's run at once: nothing arrived
  in its interval, so it trains nothing and predicts nothing;
- a backfill of the runs dated 2 and 3 March (standing for 1 and 2 March; the backfill's own
  concurrency, up to 10 runs at once) trains each on the data as of its date and predicts the
  previous day's arrivals; the two trainings never overlap, and LATEST ends on the newer model;
- a manual run (`airflow dags trigger`) with `retrain=never, predict_all=true` predicts every
  subject with the model in force, training nothing;
- a manual run whose conf has a mistyped Param fails in check_params, once, naming it.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.airflow_deployment import airflow_deployment

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAG_ID = "deeppostures_model_selection"
ONE_MODEL = {"learning_rate": [0.003], "amp_factor": [0.25], "l2": [0.0001], "window_minutes": [3]}
ARRIVALS = {"2024-03-01T10:00:00+00:00": ["S0001", "S0002", "S0003", "S0004"],
            "2024-03-02T10:00:00+00:00": ["S0005", "S0006"]}


def _arrive(h5_root: str) -> None:
    for at, subjects in ARRIVALS.items():
        ns = int(dt.datetime.fromisoformat(at).timestamp()) * 1_000_000_000
        for subject in subjects:
            for path in glob.glob(os.path.join(h5_root, subject, "*.h5")):
                os.utime(path, ns=(ns, ns))


def _csvs(folder: str) -> list[str]:
    return sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(folder, "*.csv")))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from cerebro_tasks.deeppostures.synth import synthesize

    base = tmp_path_factory.mktemp("airflow_scheduler")
    home = str(base / "cerebro")
    synthesize(f"{home}/h5", subjects=6, days=2, seed=7, windows_per_day=360)
    _arrive(f"{home}/h5")
    # what the hourly ingest does as files arrive: the DAG's own convert tasks then find nothing new
    # and answer without Spark (fewer Spark applications on 2 cores keep this test short)
    subprocess.run([sys.executable, "-m", "cerebro_tasks.cli", "convert", "--input", f"{home}/h5",
                    "--output", f"{home}/dataset"], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    dags = base / "dags"  # only the DAG under test: the hourly ingest would add Asset-triggered runs
    dags.mkdir()
    os.symlink(os.path.join(ROOT, "dags", f"{DAG_ID}.py"), dags / f"{DAG_ID}.py")
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "CEREBRO_RUN_DEFAULTS"}
    env.update({"CEREBRO_HOME": home, "PYSPARK_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2",
                "AIRFLOW_CONN_SPARK_DEFAULT": '{"conn_type": "spark", "host": "local[2,3]"}',
                "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])})
    started = time.monotonic()
    with airflow_deployment(str(base / "airflow"), dags_folder=str(dags), plugins_folder=os.path.join(ROOT, "plugins"),
                            env=env) as airflow:
        # runs dated 2 and 3 March stand for the days before: [1 March, 2 March) and [2 March, 3 March);
        # one configuration of the embedded search, one epoch, keeps the two trainings short
        airflow.cli("backfill", "create", "--dag-id", DAG_ID, "--from-date", "2024-03-02", "--to-date", "2024-03-03",
                    "--dag-run-conf", json.dumps({"num_epochs": 1, "search_space": ONE_MODEL}))
        airflow.trigger(DAG_ID, "mistyped", {"num_epoch": 1})
        airflow.start_components()
        backfill = [r["run_id"] for r in airflow.runs(DAG_ID) if r["run_type"] == "backfill"]
        states = airflow.wait_for_runs(DAG_ID, backfill + ["mistyped"], timeout_s=900)
        # after the backfill: predict everyone with the model in force, no training
        airflow.trigger(DAG_ID, "predict-all", {"retrain": "never", "predict_all": True})
        scheduled = airflow.wait_for("the scheduled run", lambda: [r["run_id"] for r in airflow.runs(DAG_ID)
                                                                   if r["run_type"] == "scheduled"], 120)
        states.update(airflow.wait_for_runs(DAG_ID, ["predict-all", *scheduled], timeout_s=600))
        tis = {run_id: airflow.task_instances(DAG_ID, run_id) for run_id in states}
        runs = {r["run_id"]: dict(r) for r in airflow.runs(DAG_ID)}
        log_root = os.path.join(airflow.home, "logs")
    print(f"real-scheduler deployment: {time.monotonic() - started:.0f} s from start to stop")
    return {"home": home, "states": states, "tis": tis, "runs": runs, "backfill": backfill,
            "scheduled": scheduled, "log_root": log_root}


def test_runs_end_as_they_should(deployment):
    states = deployment["states"]
    assert {r: s for r, s in states.items() if r != "mistyped"} == {r: "success" for r in states if r != "mistyped"}
    assert states["mistyped"] == "failed"


def test_backfill_trains_each_date_on_its_data_and_predicts_its_arrivals(deployment):
    home = deployment["home"]
    ends = {deployment["runs"][r]["data_interval_end"][:10]: r for r in deployment["backfill"]}
    assert sorted(ends) == ["2024-03-02", "2024-03-03"]
    day2, day3 = ends["2024-03-02"], ends["2024-03-03"]
    for run_id in (day2, day3):
        assert {t: ti["state"] for t, ti in deployment["tis"][run_id].items()} == {
            t: "success" for t in ("check_params", "convert", "plan", "split", "train", "export", "predict")}
    safe = {r: r.replace(":", "_").replace("+", "_") for r in (day2, day3)}
    split2 = json.load(open(f"{home}/work/{safe[day2]}/prepared/split.json"))
    split3 = json.load(open(f"{home}/work/{safe[day3]}/prepared/split.json"))
    def members(split):
        return sorted(s for name in ("train", "val") for part in split["partitions"][name] for s in part["subjects"])
    assert members(split2) == ["S0001", "S0002", "S0003", "S0004"]  # S0005-6 arrived after 2 March 00:00
    assert members(split3) == [f"S000{i}" for i in range(1, 7)]
    # the 2 March run predicted 1 March's arrivals with its model; 3 March's, 2 March's arrivals
    assert _csvs(f"{home}/predictions/deeppostures-{safe[day2]}") == ["S0001", "S0002", "S0003", "S0004"]
    assert set(_csvs(f"{home}/predictions/deeppostures-{safe[day3]}")) >= {"S0005", "S0006"}
    meta = json.load(open(f"{home}/exports/{safe[day3]}/metadata.json"))
    assert meta["as_of"] == "2024-03-03T00:00:00+00:00"
    assert open(f"{home}/exports/LATEST").read().strip() == safe[day3]


def test_trainings_never_overlap(deployment):
    spans = sorted((ti["start_date"], ti["end_date"]) for tis in deployment["tis"].values()
                   for t, ti in tis.items() if t == "train" and ti["state"] == "success")
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0], spans


def test_scheduled_run_with_nothing_new_costs_nothing(deployment):
    (run_id,) = deployment["scheduled"]
    tis = deployment["tis"][run_id]
    assert tis["plan"]["state"] == "success"
    logs = glob.glob(os.path.join(deployment["log_root"], f"dag_id={DAG_ID}", f"run_id={run_id}", "task_id=convert",
                                  "*.log"))
    assert logs and "answered without starting Spark" in open(logs[0]).read()
    assert {t: tis[t]["state"] for t in ("split", "train", "export", "predict")} == {
        t: "skipped" for t in ("split", "train", "export", "predict")}


def test_manual_run_predicts_with_the_model_in_force(deployment):
    home = deployment["home"]
    day3 = max(deployment["backfill"], key=lambda r: deployment["runs"][r]["data_interval_end"])
    tis = deployment["tis"]["predict-all"]
    assert tis["train"]["state"] == "skipped" and tis["predict"]["state"] == "success"
    safe = day3.replace(":", "_").replace("+", "_")
    assert _csvs(f"{home}/predictions/deeppostures-{safe}") == [f"S000{i}" for i in range(1, 7)]


def test_mistyped_conf_fails_once_naming_the_key(deployment):
    ti = deployment["tis"]["mistyped"]["check_params"]
    assert ti["state"] == "failed" and ti["try_number"] == 1  # no retry: it could never succeed
    logs = glob.glob(os.path.join(deployment["log_root"], f"dag_id={DAG_ID}", "run_id=mistyped",
                                  "task_id=check_params", "*.log"))
    assert logs and "unknown Param(s) ['num_epoch']" in open(logs[0]).read()
