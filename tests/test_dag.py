"""The DAG folder imports cleanly in a real Airflow DagBag and has the designed task graph."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dagbag(airflow_env):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=os.path.join(ROOT, "dags"))


def test_dag_folder_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "deeppostures_model_selection" in dagbag.dag_ids


def test_task_graph(dagbag):
    dag = dagbag.dags["deeppostures_model_selection"]
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == {("check_params", "convert"), ("convert", "plan"), ("plan", "split"), ("plan", "predict"),
                     ("split", "train"), ("train", "export"), ("export", "predict")}
    train = dag.get_task("train")
    assert type(train).__name__ == "MOPTrainingOperator"
    assert train.max_active_tis_per_dag == 1  # one training at a time, whatever the runs' kinds
    assert dag.get_task("predict").trigger_rule == "none_failed_min_one_success"  # also without training
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    assert all(isinstance(dag.get_task(t), SparkSubmitOperator) for t in ("convert", "split", "train", "predict"))
    assert {"config", "run_id", "application_args", "conf"} <= set(train.template_fields)


def test_dag_file_imports_nothing_heavy(airflow_env):
    """Parsing must not pay for TensorFlow, Spark or Petastorm (the scheduler parses it often)."""
    code = ("import sys, runpy; sys.path.insert(0, %r); runpy.run_path(%r); "
            "heavy = [m for m in ('tensorflow', 'keras', 'pyspark', 'petastorm', 'h5py', 'cerebro_tasks.mop.runtime') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
            % (os.path.join(ROOT, "plugins"), os.path.join(ROOT, "dags", "deeppostures_model_selection.py")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schedule_daily_or_on_new_data(dagbag):
    dag = dagbag.dags["deeppostures_model_selection"]
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert "deeppostures_windows" in str(dag.timetable.asset_condition)
    assert dag.description.startswith("Daily at 00:00 UTC and on new data (deeppostures_windows)")
    # a daily run's data interval is the day before it: what arrived then is what that run predicts
    assert dag.timetable.timetable.interval == datetime.timedelta(days=1)
    ingest = dagbag.dags["deeppostures_ingest"]
    edges = {(t.task_id, d) for t in ingest.tasks for d in t.downstream_task_ids}
    assert edges == {("convert", "announce")}
    assert [a.name for a in ingest.get_task("announce").outlets] == ["deeppostures_windows"]


@pytest.mark.parametrize("name, value", [
    ("num_workers", 0), ("num_epochs", "ten"), ("search_kind", "bayes"), ("val_fraction", 1.5),
    ("metric", "loss"), ("padding", "reflect"), ("batch_size", -1), ("search_space", {}),
    ("ensemble_k", 2), ("label_map", {"sitting": 0}), ("label_map", {"a": 0, "b": "one"}),
    ("early_stopping", "asha"), ("mode", "up"), ("select", "best"),
])
def test_bad_params_are_rejected_naming_the_parameter(dagbag, name, value):
    """What Airflow runs when a run is triggered with a conf (UI form, API, CLI)."""
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dagbag.dags["deeppostures_model_selection"].params)
    with pytest.raises(ParamValidationError, match=f"param {name}"):
        params.update({name: value})
        params.validate()


def test_unattended_runs_search_what_the_deployment_file_says(airflow_env, tmp_path):
    """CEREBRO_RUN_DEFAULTS names the file; the Params' defaults (what scheduled runs use and the
    trigger form shows) follow it; a mistake in it is an import error naming it."""
    code = ("import json, sys; from airflow.dag_processing.dagbag import DagBag; "
            "bag = DagBag(dag_folder=sys.argv[1]); "
            "dag = bag.dags.get('deeppostures_model_selection'); "
            "print('RESULT ' + json.dumps({'errors': [str(e) for e in bag.import_errors.values()], "
            "'defaults': dag.params.dump() if dag else None}))")
    published = os.path.join(ROOT, "examples", "run_defaults_published.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_epoch": 5}))

    def parse(defaults_file: str | None) -> dict:
        env = {k: v for k, v in airflow_env.items() if k != "CEREBRO_RUN_DEFAULTS"}
        if defaults_file:
            env["CEREBRO_RUN_DEFAULTS"] = defaults_file
        proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "dags")], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.split("RESULT ", 1)[1])

    from cerebro_tasks.deeppostures.workload import PUBLISHED_BATCH_SIZE, PUBLISHED_EPOCHS, PUBLISHED_SPACE

    embedded = parse(None)["defaults"]
    assert embedded["num_epochs"] == 3 and len(embedded["search_space"]["learning_rate"]) == 2
    production = parse(published)["defaults"]
    assert (production["search_space"], production["num_epochs"], production["batch_size"]) == \
        (PUBLISHED_SPACE, PUBLISHED_EPOCHS, PUBLISHED_BATCH_SIZE)
    assert production["h5_root"] == embedded["h5_root"]  # what the file leaves out keeps its default
    broken = parse(str(bad))
    assert broken["defaults"] is None and "num_epoch" in broken["errors"][0] and str(bad) in broken["errors"][0]


def _check(dagbag, conf: dict, **overrides):
    """Run check_params' callable as its task would, with this conf merged into the params."""
    import copy
    import types

    dag = dagbag.dags["deeppostures_model_selection"]
    params = copy.deepcopy(dag.params)
    params.update({**conf, **overrides})
    return dag.get_task("check_params").python_callable(
        params=params.validate(), run_id="manual__2024-03-05T00:00:00+00:00", dag_run=types.SimpleNamespace(conf=conf))


def test_unknown_conf_keys_fail_without_retry_naming_them(dagbag):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=r"unknown Param\(s\) \['num_epoch', 'serach_kind'\]"):
        _check(dagbag, {"num_epoch": 1, "serach_kind": "tpe", "num_workers": 2})
    assert _check(dagbag, {"num_workers": 2})["run_id"] == "manual__2024-03-05T00_00_00_00_00"


def test_more_workers_than_task_slots_fail_naming_both_numbers(dagbag):
    """The embedded connection is local[2,3]: 3 workers could never start their barrier stage."""
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=r"num_workers: 3 MOP workers need 3 task slots.*local\[2,3\]\) has 2"):
        _check(dagbag, {"num_workers": 3})


def test_a_bad_search_fails_without_retry(dagbag):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="window_minutes"):
        _check(dagbag, {"search_space": {"window_minutes": [3.05]}})


def test_local_task_slots():
    from cerebro_tasks.spark_session import local_task_slots

    assert [local_task_slots(m) for m in ("local", "local[4]", "local[2,3]", "local[*]")] == [1, 4, 2, os.cpu_count()]
    assert local_task_slots("spark://master:7077") is None and local_task_slots("yarn") is None


def test_published_example_is_the_published_search():
    from cerebro_settings import SETTABLE, run_defaults

    published = os.path.join(ROOT, "examples", "run_defaults_published.json")
    with pytest.raises(ValueError, match="CEREBRO_RUN_DEFAULTS=/no/such/file"):
        run_defaults({"CEREBRO_RUN_DEFAULTS": "/no/such/file"})
    assert set(json.load(open(published))) <= set(SETTABLE)
    assert run_defaults({"CEREBRO_RUN_DEFAULTS": published})["num_epochs"] == 10


def test_asset_event_carries_what_the_ingest_converted(dagbag):
    """What `announce` puts in the `deeppostures_windows` event's extra (the end-to-end test reads
    it back from a real event); nothing converted: no event at all."""
    import types

    from airflow.sdk.exceptions import AirflowSkipException

    announce = dagbag.dags["deeppostures_ingest"].get_task("announce").python_callable
    (asset,) = dagbag.dags["deeppostures_ingest"].get_task("announce").outlets
    events = {asset: types.SimpleNamespace(extra=None)}
    report = {"files": {"converted": 4, "removed": 0}, "version": 3, "new_subjects": ["S0007", "S0008"],
              "windows": {"total": 1000}}
    assert announce(report, outlet_events=events) == events[asset].extra == {
        "dataset_version": 3, "new_subjects": ["S0007", "S0008"], "converted_files": 4, "removed_files": 0,
        "windows": 1000}
    with pytest.raises(AirflowSkipException):
        announce({"files": {"converted": 0, "removed": 0}}, outlet_events=events)
