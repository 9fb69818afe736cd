"""The whole DAG, end to end, through `airflow dags test` on tiny generated data.

Real Airflow (SQLite), real spark-submit jobs on local Spark, real Petastorm files, real Keras
training with models hopping between two Spark workers, a real export and real CHAP files. The
exported model must then beat the majority class on subjects it has never seen.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONF = {"search_space": {"learning_rate": [0.003, 0.001], "amp_factor": [0.25], "l2": [0.0001], "window_minutes": [3]},
        "num_epochs": 3, "num_workers": 2, "batch_size": 16}


def run(cmd: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def home(airflow_env):
    home = airflow_env["CEREBRO_HOME"]
    synth(home, subjects=6, env=airflow_env)
    run(["airflow", "db", "migrate"], airflow_env, timeout=300)
    return home


def synth(home: str, subjects: int, env: dict[str, str]) -> None:
    run(["cerebro-tasks", "synth", "--out", f"{home}/h5", "--subjects", str(subjects), "--days", "2",
         "--windows-per-day", "1440", "--seed", "7"], env)


def dags_test(logical_date: str, conf: dict, env: dict[str, str], ok: bool = True) -> str:
    cmd = ["airflow", "dags", "test", "deeppostures_model_selection", logical_date, "-c", json.dumps(conf)]
    if ok:
        proc = run(cmd, env)
    else:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dag_run(home, airflow_env):
    log = dags_test("2024-03-05", CONF, airflow_env)
    return home, log, open(f"{home}/exports/LATEST").read().strip()


def test_dag_run_succeeds(dag_run):
    _, log, _ = dag_run
    finished = [line for line in log.splitlines() if "DagRun Finished" in line]
    assert finished and "state=success" in finished[-1], finished


def test_artefacts_of_every_task(dag_run):
    home, _, run_id = dag_run
    assert os.path.exists(f"{home}/dataset/_cerebro_manifest.json")
    run_dir = f"{home}/store/runs/{run_id}"
    for name in ("result.json", "history.json", "summary.md", "learning_curves.png", "timeline.png"):
        assert os.path.exists(f"{run_dir}/{name}"), name
    result = json.load(open(f"{run_dir}/result.json"))
    assert result["models"] == 2 and not result["failed_models"]
    # models hopped: both workers trained both models
    records = json.load(open(f"{run_dir}/timeline.json"))["records"]
    for model in ("m000", "m001"):
        assert {r["partition"] for r in records if r["unit"]["model_id"] == model and r["unit"]["kind"] == "train"} == {0, 1}
    export = f"{home}/exports/{run_id}"
    meta = json.load(open(f"{export}/metadata.json"))
    assert meta["model_id"] == result["best_model_id"]
    manifest = meta["data_manifest"]
    assert len(manifest["subjects"]["train"]) + len(manifest["subjects"]["val"]) == 6 and manifest["dataset_version"]
    assert set(meta["history"]) >= {"train_loss", "val_loss", "val_balanced_accuracy"} and meta["packages"]["keras"]
    assert os.path.isdir(f"{export}/saved_model") and os.path.exists(f"{export}/model.keras")
    csvs = sorted(glob.glob(f"{home}/predictions/deeppostures-{run_id}/*.csv"))
    assert [os.path.basename(c) for c in csvs] == [f"S000{i}.csv" for i in range(1, 7)]
    assert open(csvs[0]).readline().strip() == "segment,timestamp,prediction"
    assert glob.glob(f"{home}/predictions/deeppostures-{run_id}/parquet/subject=S0001/*.parquet")


def test_model_beats_majority_class_on_unseen_subjects(dag_run, tmp_path):
    """Held-out subjects generated with another seed: the exported model, not the training run."""
    home, _, run_id = dag_run
    import keras

    from cerebro_tasks.deeppostures.h5format import list_h5_files, read_h5
    from cerebro_tasks.deeppostures.sequences import build_training_sequences
    from cerebro_tasks.deeppostures.synth import synthesize
    from cerebro_tasks.deeppostures.workload import custom_objects
    from cerebro_tasks.deeppostures.metrics import balanced_accuracy

    synthesize(str(tmp_path / "heldout"), subjects=3, days=2, seed=99, windows_per_day=720, subject_prefix="H")
    days = [read_h5(p) for _, _, p in list_h5_files(str(tmp_path / "heldout"))]
    table = {"id": np.concatenate([[d.subject] * d.num_windows for d in days]),
             "time": np.concatenate([d.time for d in days]).astype(np.int64),
             "data": np.concatenate([d.data for d in days]).astype(np.float32),
             **{k: np.concatenate([getattr(d, k) for d in days]).astype(np.int32) for k in ("non_wear", "sleeping", "label")}}
    model = keras.saving.load_model(f"{home}/exports/{run_id}/model.keras", custom_objects=custom_objects())
    x, y = build_training_sequences(table, int(model.input_shape[1]))
    scores = model.predict(x, verbose=0)
    pred = np.argmax(scores, axis=-1)
    # the SavedModel (for serving without this package) gives the same answers
    import tensorflow as tf

    saved = tf.saved_model.load(f"{home}/exports/{run_id}/saved_model")  # keep it: its variables live here
    served = saved.serve(tf.constant(x[:8]))
    np.testing.assert_allclose(np.asarray(served), scores[:8], rtol=1e-4, atol=1e-5)
    majority = max(np.mean(y == 0), np.mean(y == 1))
    accuracy = float(np.mean(pred == y))
    bacc = balanced_accuracy(y.reshape(-1), pred.reshape(-1))
    print(f"held-out: accuracy {accuracy:.3f} (majority {majority:.3f}), balanced accuracy {bacc:.3f}")
    assert bacc > 0.7
    assert accuracy > majority


def test_bad_search_space_fails_before_any_spark_job(home, airflow_env, tmp_path):
    untouched = tmp_path / "dataset"
    log = dags_test("2024-03-04", {**CONF, "search_space": {"learning_rate": []}, "dataset_url": str(untouched)},
                    airflow_env, ok=False)
    assert "search.space" in log and "learning_rate" in log
    assert "spark-submit" not in log and not untouched.exists()  # check_params failed first


def test_backfill_second_date_adds_subjects(dag_run, airflow_env):
    """The next logical date sees two new subjects: trained on, and only they get predictions."""
    home, _, first_run = dag_run
    synth(home, subjects=8, env=airflow_env)  # S0001-S0006 rewritten byte for byte, S0007-S0008 new
    # the hourly ingest converts the new days and announces them (the Asset that triggers training)
    proc = run(["airflow", "dags", "test", "deeppostures_ingest", "2024-03-06T01:00:00+00:00"], airflow_env)
    log = proc.stdout + proc.stderr
    assert "'converted': 4" in log and "nothing to announce" not in log
    # the Asset event says what the ingest converted
    import sqlite3

    con = sqlite3.connect(f"file:{airflow_env['AIRFLOW_HOME']}/airflow.db?mode=ro", uri=True)
    (extra,) = con.execute("SELECT extra FROM asset_event ORDER BY id DESC LIMIT 1").fetchone()
    con.close()
    extra = json.loads(extra)
    assert extra["new_subjects"] == ["S0007", "S0008"] and extra["converted_files"] == 4
    assert extra["dataset_version"] >= 2
    dags_test("2024-03-06", CONF, airflow_env)
    second_run = open(f"{home}/exports/LATEST").read().strip()
    assert second_run != first_run
    csvs = sorted(os.path.basename(p) for p in glob.glob(f"{home}/predictions/deeppostures-{second_run}/*.csv"))
    assert csvs == ["S0007.csv", "S0008.csv"]
    ledger = json.load(open(f"{home}/predictions/_predicted_subjects.json"))["subjects"]
    assert sorted(ledger) == [f"S000{i}" for i in range(1, 9)]
    # the subject split is stable: whoever trained in the first run still trains in the second
    first = json.load(open(f"{home}/work/{first_run}/prepared/split.json"))
    second = json.load(open(f"{home}/work/{second_run}/prepared/split.json"))
    def members(split, name):
        return {s for part in split["partitions"][name] for s in part["subjects"]}
    assert members(first, "train") <= members(second, "train")
    assert members(first, "val") <= members(second, "val")
    assert len(members(second, "train") | members(second, "val")) == 8
    # nothing new since: the next ingest converts nothing and emits no Asset event
    log = run(["airflow", "dags", "test", "deeppostures_ingest", "2024-03-06T02:00:00+00:00"], airflow_env)
    assert "nothing to announce" in log.stdout + log.stderr


RETRY_TASK = """
import json, sys
sys.path.insert(0, sys.argv[3])
from cerebro_operators import MOPTrainingOperator
op = MOPTrainingOperator(task_id="train", config=sys.argv[1], run_id=sys.argv[2])
print("XCOM " + json.dumps(op.execute({})))
"""


def test_training_task_retry_resumes_the_run(dag_run, airflow_env, tmp_path):
    """Attempt 1 of the train task dies mid-search; attempt 2 (same run id) finishes from the journal."""
    import signal
    import sys
    import time

    from cerebro_tasks.mop.journal import Journal
    from cerebro_tasks.storage.store import Store

    home, _, first_run = dag_run
    config = {"prepared_url": f"{home}/work/{first_run}/prepared", "store_url": str(tmp_path / "store"),
              "run_id": "placeholder", "num_workers": 2, "batch_size": 16,
              "search": {"space": CONF["search_space"], "num_epochs": 2}}
    cmd = [sys.executable, "-c", RETRY_TASK, json.dumps(config), "retry-run", os.path.join(ROOT, "plugins")]
    journal = Journal(Store(str(tmp_path / "store" / "runs" / "retry-run")))
    attempt1 = subprocess.Popen(cmd, env=airflow_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and len(journal.records()) < 3 and attempt1.poll() is None:
        time.sleep(0.5)
    os.killpg(attempt1.pid, signal.SIGKILL)  # the worker running the task dies with spark-submit and Spark
    attempt1.wait()
    done = len(journal.records())
    total = 2 * 2 * (2 + 2)
    assert 3 <= done < total
    attempt2 = run(cmd, airflow_env)
    xcom = json.loads(attempt2.stdout.split("XCOM ", 1)[1].splitlines()[0])
    assert xcom["run_id"] == "retry-run" and xcom["best_model_id"] in ("m000", "m001")
    assert len(journal.records()) == total
    result = json.load(open(tmp_path / "store" / "runs" / "retry-run" / "result.json"))
    assert result["units_run"] == total - done  # only what was not on record ran again
