"""The DAG folder imports cleanly in a real Airflow DagBag and has the designed task graph."""

from __future__ import annotations

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
    assert edges == {("check_params", "convert"), ("convert", "split"), ("split", "train"),
                     ("train", "export"), ("export", "predict")}
    train = dag.get_task("train")
    assert type(train).__name__ == "MOPTrainingOperator"
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
