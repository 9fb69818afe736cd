"""Airflow operators that submit `cerebro-tasks` steps as Spark applications.

Both build on the Spark provider's `SparkSubmitOperator`: the Spark connection (`spark_default`,
whose host is the master: `local[2]`, `spark://host:7077`, `yarn`, `k8s://...`) says where the job
runs, and the step's JSON summary comes back through a small result file, so only metadata
(paths, ids, figures) reaches XCom. Nothing heavy is imported here: DAG parsing stays fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from importlib.util import find_spec
from typing import Any, Sequence

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException


def spark_entry_path() -> str:
    """The installed `cerebro_tasks/spark_entry.py`, found without importing the package."""
    spec = find_spec("cerebro_tasks")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("cerebro_tasks is not installed in the Airflow worker's Python environment")
    return os.path.join(list(spec.submodule_search_locations)[0], "spark_entry.py")


def safe_run_id(run_id: str) -> str:
    """An Airflow run id (`manual__2024-03-04T00:00:00+00:00`) as a folder-safe id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("_.") or "run"


def spark_task_slots(conn_id: str = "spark_default") -> tuple[int | None, str]:
    """How many tasks the Spark connection's master runs at once, and that master.

    A local master says it (`local[2,3]`: 2); a cluster's slots are known only when the
    connection's extra holds `task_slots` (e.g. `{"task_slots": 8}`), else None: the MOP driver
    then fails after its start timeout naming the slots it needs.
    """
    from airflow.sdk import BaseHook

    from cerebro_tasks.spark_session import local_task_slots

    conn = BaseHook.get_connection(conn_id)
    master = f"{conn.host}:{conn.port}" if conn.port else str(conn.host or "")
    slots = local_task_slots(master)
    if slots is None and conn.extra_dejson.get("task_slots") is not None:
        slots = int(conn.extra_dejson["task_slots"])
    return slots, master


class CerebroSparkSubmitOperator(SparkSubmitOperator):
    """Runs one `cerebro-tasks <step>` with spark-submit and returns the step's JSON summary.

    :param step: the CLI step (`convert`, `split`, `train`, `predict`).
    :param step_args: the step's arguments (templated).
    :param result_dir: where the step writes its summary; must be visible to this worker
        (a local temp folder by default, which suits client deploy mode). (templated)
    :param xcom_keys: the keys of the step's summary that go to XCom (default: all). A study's
        reports list files and subjects; the full report stays in the step's output folder.

    Every `SparkSubmitOperator` argument (`conn_id`, `conf`, `executor_cores`, ...) is accepted.
    `PYSPARK_PYTHON` defaults to this worker's Python so executors see the same packages.
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "step_args", "result_dir")

    def __init__(self, *, step: str, step_args: Sequence[str] = (), result_dir: str | None = None,
                 xcom_keys: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"cerebro-{step}")
        env = dict(kwargs.pop("env_vars", None) or {})
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        # the application path is resolved when the task runs, not each time the DAG is parsed
        super().__init__(application="", env_vars=env, **kwargs)
        self.step = step
        self.step_args = list(step_args)
        self.result_dir = result_dir
        self.xcom_keys = list(xcom_keys) if xcom_keys is not None else None

    def execute(self, context: Any) -> Any:
        from cerebro_tasks.cli import answer_without_spark, build_parser, describe_error, step_errors

        try:
            known = answer_without_spark(build_parser().parse_args([self.step, *[str(a) for a in self.step_args]]))
        except step_errors() as err:
            raise failure_exception(describe_error(self.step, err)) from None
        if known is not None:
            self.log.info("cerebro-tasks %s: answered without starting Spark: %s", self.step, known)
            return self.summarise(known)
        self.application = self.application or spark_entry_path()
        own_dir = self.result_dir is None
        result_dir = self.result_dir or tempfile.mkdtemp(prefix=f"cerebro-{self.step}-")
        result_file = os.path.join(result_dir, f"{self.task_id}.json")
        self.application_args = ["--result-file", result_file, self.step, *[str(a) for a in self.step_args]]
        _put_spark_submit_on_path()
        from cerebro_tasks.cli import error_file

        if os.path.exists(error_file(result_file)):  # an earlier attempt's, in a result_dir of the user's
            os.remove(error_file(result_file))
        try:
            try:
                super().execute(context)
            except AirflowException as err:
                raise step_failure(result_file) or err
            with open(result_file) as f:
                result = json.load(f)
        finally:
            if own_dir:
                shutil.rmtree(result_dir, ignore_errors=True)
        return self.summarise(result)

    def summarise(self, result: Any) -> Any:
        """What goes to XCom: the `xcom_keys` of the summary."""
        if self.xcom_keys is None or not isinstance(result, dict):
            return result
        return {k: result[k] for k in self.xcom_keys if k in result}


# the training step's result.json holds full histories; XCom gets what the next tasks need
TRAIN_XCOM = ("run_id", "run_url", "metric", "best_model_id", "best_params", "best_value", "best_checkpoint",
              "models", "failed_models", "seconds", "utilisation", "hop_overhead", "select", "best_epoch",
              "stopped_models")


class MOPTrainingOperator(CerebroSparkSubmitOperator):
    """Model selection with Model Hopper Parallelism as one Spark application.

    :param config: the run configuration (`cerebro_tasks.config.TrainConfig` as a dict or JSON
        text; templated), or
    :param config_path: a JSON file holding it (templated).
    :param run_id: the search's run id (templated; default: this DAG run's id). A retry of the task
        submits the same run id, and the engine resumes from the run's journal.
    :param num_workers: MOP workers (one data partition each); overrides the config's value.
        (templated)
    :param gpus_per_worker: GPUs per worker task (0 = CPU). With GPUs, the executors need
        `spark.executor.resource.gpu.amount` and a discovery script (`gpu_discovery_script`).
        (templated)
    :param gpu_discovery_script: path of the GPU discovery script on the executors.

    Returns (XCom) the small result: run id, best model id and configuration, its metric value,
    store paths and the run's utilisation.
    """

    template_fields: Sequence[str] = (*CerebroSparkSubmitOperator.template_fields, "config", "config_path", "run_id",
                                      "num_workers", "gpus_per_worker")

    def __init__(self, *, config: dict[str, Any] | str | None = None, config_path: str | None = None,
                 run_id: str = "{{ run_id }}", num_workers: int | str | None = None, gpus_per_worker: int | str = 0,
                 gpu_discovery_script: str | None = None, **kwargs: Any) -> None:
        if (config is None) == (config_path is None):
            raise ValueError("MOPTrainingOperator needs exactly one of config= or config_path=")
        conf = dict(kwargs.pop("conf", None) or {})
        # a failed worker task comes back (Spark retries the barrier stage) instead of failing the job
        conf.setdefault("spark.task.maxFailures", "4")
        kwargs.setdefault("xcom_keys", TRAIN_XCOM)
        super().__init__(step="train", conf=conf, name=kwargs.pop("name", "cerebro-mop"), **kwargs)
        self.config = config
        self.config_path = config_path
        self.run_id = run_id
        self.num_workers = num_workers
        self.gpus_per_worker = gpus_per_worker
        self.gpu_discovery_script = gpu_discovery_script

    def execute(self, context: Any) -> Any:
        if self.config_path is not None:
            with open(self.config_path) as f:
                config = json.load(f)
        else:
            config = json.loads(self.config) if isinstance(self.config, str) else dict(self.config)
        config["run_id"] = safe_run_id(str(self.run_id))
        if self.num_workers not in (None, ""):
            config["num_workers"] = int(self.num_workers)
        gpus = int(self.gpus_per_worker or 0)
        if gpus:  # one (or more) GPUs per worker task; Spark hands each task its own addresses
            self.conf = dict(self.conf or {})
            self.conf.setdefault("spark.executor.resource.gpu.amount", str(gpus))
            self.conf.setdefault("spark.task.resource.gpu.amount", str(gpus))
            if self.gpu_discovery_script:
                self.conf.setdefault("spark.executor.resource.gpu.discoveryScript", self.gpu_discovery_script)
        self.step_args = ["--config", json.dumps(config, sort_keys=True)]
        return super().execute(context)


def step_failure(result_file: str) -> AirflowException | None:
    """The step's own one-line error as the task's failure, or None when the step left none (it
    crashed, or spark-submit failed before the step ran).

    Bad input or configuration cannot succeed on a retry: AirflowFailException ends the task at
    once; the rest (a busy dataset, a lost cluster) stays retryable.
    """
    from cerebro_tasks.cli import error_file

    try:
        with open(error_file(result_file)) as f:
            return failure_exception(json.load(f))
    except (OSError, ValueError, KeyError):
        return None


def failure_exception(failure: dict[str, Any]) -> AirflowException:
    """`cerebro_tasks.cli.describe_error`'s record as the exception that fails the task."""
    return (AirflowException if failure.get("retryable") else AirflowFailException)(failure["error"])


def _put_spark_submit_on_path() -> None:
    """Prefer the `spark-submit` of this Python's environment (the hook runs it by name from PATH)."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "spark-submit")) and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
