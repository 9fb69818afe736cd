"""DeepPostures (CHAP) model selection with Model Hopper Parallelism on Spark.

    check_params -> convert -> plan -> split -> train (MOP) -> export -> predict
                                |                                         ^
                                +-----------------------------------------+

Runs daily at 00:00 UTC, and whenever `deeppostures_ingest` announces new data (the
`deeppostures_windows` Asset). A scheduled or backfill run for the data interval [start, end)
works on the dataset as of `end` (the files that had arrived by then; arrival = the H5 file's
mtime as the conversion recorded it), predicts the subjects with a file arriving in [start, end),
and retrains as the `retrain` Param says (always / new_data / never); a manual or Asset-triggered
run works on all current data and predicts the subjects no run has predicted yet. A run that
does not retrain predicts with the model in force: the export with the latest `as_of` not after
its own. `plan` decides which of split -> train -> export and predict run. Training never runs
twice at once (`max_active_tis_per_dag=1`), whatever the backfill's concurrency, and LATEST only
moves forward in data order. Backfill with
`airflow backfill create --dag-id deeppostures_model_selection --from-date ... --to-date ... --max-active-runs 1`
so that each date's model is in force for the next.

Unattended runs (scheduled, Asset-triggered, backfill) use the Param defaults, which a
deployment sets in the file `$CEREBRO_RUN_DEFAULTS` names (plugins/cerebro_settings.py).

Every Spark step is a spark-submit of `cerebro-tasks <step>` through the `spark_default`
connection (local mode by default; a standalone, YARN or Kubernetes master by changing the
connection, not the code). Paths of one DAG run are keyed by its run id, so runs never share
outputs; the windows dataset is shared and converted incrementally. Only paths, ids and figures
travel through XCom. Parsing this file needs Airflow and the cerebro_tasks package's light parts
(no TensorFlow, Spark or Petastorm is imported until a task runs).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, task

from cerebro_assets import DATASET_URL, H5_ROOT, HOME, WINDOWS_DATASET
from cerebro_operators import CerebroSparkSubmitOperator, MOPTrainingOperator
from cerebro_settings import run_defaults

# what unattended runs search: the embedded small search unless the deployment's file says otherwise
DEFAULTS = run_defaults()
SPARK_CONN_ID = "spark_default"


# what travels through XCom; the full reports stay beside the data (quarantine, split.json)
CONVERT_XCOM = ["dataset_url", "files", "windows", "subjects", "new_subjects", "version", "seconds"]
SPLIT_XCOM = ["dataset_url", "fractions", "imbalance", "empty_partitions", "seconds"]

PARAMS = {
    "h5_root": Param(H5_ROOT, type="string", minLength=1, description="Pre-processed H5 files: <root>/<subject>/<YYYY-MM-DD>.h5"),
    "dataset_url": Param(DATASET_URL, type="string", minLength=1, description="Petastorm windows dataset (converted incrementally)"),
    "work_url": Param(f"{HOME}/work", type="string", minLength=1, description="Per-run prepared splits: <work>/<run_id>/"),
    "store_url": Param(f"{HOME}/store", type="string", minLength=1, description="Run store: <store>/runs/<run_id>/ (checkpoints, TensorBoard, plots)"),
    "export_url": Param(f"{HOME}/exports", type="string", minLength=1, description="Exported best models: <export>/<run_id>/ and LATEST"),
    "predictions_url": Param(f"{HOME}/predictions", type="string", minLength=1, description="CHAP predictions: <predictions>/<model>/<subject>.csv"),
    "search_kind": Param(DEFAULTS["search_kind"], enum=["grid", "random", "tpe"], description="grid: every combination; random: num_models draws; tpe: num_models proposed by TPE as results come in"),
    "search_space": Param(DEFAULTS["search_space"], type="object", minProperties=1, description="parameter -> list of choices, or {\"loguniform\": [low_exp, high_exp]} etc."),
    "num_models": Param(DEFAULTS["num_models"], type=["null", "integer"], minimum=1, description="random and TPE searches: configurations to train"),
    "num_epochs": Param(DEFAULTS["num_epochs"], type="integer", minimum=1, maximum=1000),
    "num_workers": Param(DEFAULTS["num_workers"], type="integer", minimum=1, maximum=1024, description="MOP workers = data partitions (at most the Spark connection's task slots)"),
    "batch_size": Param(DEFAULTS["batch_size"], type="integer", minimum=1, maximum=65536, description="sequences per batch"),
    "metric": Param(DEFAULTS["metric"], type="string", pattern="^(val|train)_[A-Za-z0-9_]+$", description="selection metric; its direction is the mode Param, or follows its Keras name"),
    "seed": Param(DEFAULTS["seed"], type="integer", description="seeds the search, model initialisation and shuffles"),
    "split_seed": Param(2019, type="integer", description="seeds the subject split (stable as subjects arrive)"),
    "val_fraction": Param(0.3, type="number", exclusiveMinimum=0, exclusiveMaximum=1),
    "padding": Param("drop", enum=["drop", "zero", "wrap"], description="prediction of a segment's tail shorter than T"),
    "predict_all": Param(False, type="boolean", description="predict every subject, not only those no run has predicted yet"),
    "gpus_per_worker": Param(0, type="integer", minimum=0, maximum=8),
    # The study as DeepPostures pre-processed it, and its prediction options (null: as the dataset recorded).
    "timezone": Param(None, type=["null", "string"], minLength=1, description="IANA zone of the machine that pre-processed the H5 files, e.g. America/Los_Angeles (null: the dataset's, else UTC)"),
    "label_map": Param(None, type=["null", "object"], minProperties=2, additionalProperties={"type": "integer", "minimum": 0}, description="class name -> index, e.g. {\"sitting\": 0, \"standing\": 1, \"stepping\": 2} (null: the dataset's, else sitting 0 / not-sitting 1)"),
    "output_label": Param(False, type="boolean", description="predictions: add the label column"),
    "no_segment": Param(False, type="boolean", description="predictions: leave the segment column out"),
    "ensemble_k": Param(1, type="integer", minimum=1, maximum=99, **{"not": {"multipleOf": 2}}, description="export the k best models (odd) and predict by their majority vote per window, like CHAP"),
    # early stopping, the metric's direction and which epoch is exported (search/stopping/, search/selection.py)
    "early_stopping": Param(None, type=["null", "object"], description="null, or e.g. {\"kind\": \"asha\", \"reduction_factor\": 3, \"min_epochs\": 1}; kinds: asha, hyperband, median"),
    "mode": Param(None, type=["null", "string"], enum=[None, "min", "max"], description="direction of the metric; null: from its Keras name"),
    "select": Param("last_epoch", enum=["last_epoch", "best_epoch"], description="export the last epoch's checkpoint or the best epoch's"),
    "retrain": Param(DEFAULTS["retrain"], enum=["always", "new_data", "never"], description="always: train every run; new_data: only when subjects arrived (scheduled, backfill: in the run's interval; manual: not yet predicted); never: predict with the model in force"),
}


def _check_params(p: dict, run_id: str | None, conf: dict) -> dict:
    """check_params' work; raises ConfigError naming what is wrong."""
    from cerebro_operators import safe_run_id, spark_task_slots

    from cerebro_tasks.config import TrainConfig
    from cerebro_tasks.deeppostures.classes import check_label_map
    from cerebro_tasks.deeppostures.clock import check_zone
    from cerebro_tasks.deeppostures.workload import check_search
    from cerebro_tasks.errors import ConfigError

    unknown = sorted(set(conf) - set(PARAMS))
    if unknown:
        raise ConfigError(f"unknown Param(s) {unknown} in the run's conf; this DAG's Params are {sorted(PARAMS)}")
    slots, master = spark_task_slots(SPARK_CONN_ID)
    if slots is not None and p["num_workers"] > slots:
        raise ConfigError(f"num_workers: {p['num_workers']} MOP workers need {p['num_workers']} task slots at once, "
                          f"but the Spark connection {SPARK_CONN_ID!r} ({master}) has {slots}")
    rid = safe_run_id(run_id or "manual")
    config = TrainConfig.from_dict({
        "prepared_url": f"{p['work_url'].rstrip('/')}/{rid}/prepared",
        "store_url": p["store_url"],
        "run_id": rid,
        "num_workers": p["num_workers"],
        "batch_size": p["batch_size"],
        "search": {"space": p["search_space"], "kind": p["search_kind"], "num_models": p["num_models"],
                   "num_epochs": p["num_epochs"], "seed": p["seed"], "metric": p["metric"],
                   "early_stopping": p.get("early_stopping"), "mode": p.get("mode"),
                   "select": p.get("select", "last_epoch")},
    })
    try:
        check_search(config.search.space, config.search.metric)  # hyperparameters the model knows
        if p.get("timezone"):
            check_zone(p["timezone"])  # an unknown zone fails here, naming it, not in the Spark job
        if p.get("label_map"):
            check_label_map(p["label_map"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {"run_id": rid, "prepared_url": config.prepared_url, "run_url": config.run_url,
            "model_name": f"deeppostures-{rid}", "train_config": config.to_json()}


with DAG(
    dag_id="deeppostures_model_selection",
    description="Daily at 00:00 UTC and on new data (deeppostures_windows): H5 -> Petastorm -> subject split "
                "-> MOP model selection -> export -> CHAP predictions",
    # the data interval of a daily run is the day before it: what arrived then is what it predicts
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("@daily", timezone="UTC", interval=pendulum.duration(days=1)),
        assets=[WINDOWS_DATASET]),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # scheduled and Asset runs; a backfill has its own (--max-active-runs)
    params=PARAMS,
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=10)},
    tags=["cerebro", "deeppostures", "mop"],
    doc_md=__doc__,
) as dag:

    @task
    def check_params(params: dict | None = None, run_id: str | None = None, dag_run=None) -> dict:
        """Validate the whole run configuration before any Spark job starts; resolve run paths.

        Every error here is a configuration error, which no retry can fix: the task fails at once
        (AirflowFailException) with the error as its message.
        """
        from airflow.sdk.exceptions import AirflowFailException

        from cerebro_tasks.errors import ConfigError

        try:
            return _check_params(params or {}, run_id, dict(getattr(dag_run, "conf", None) or {}))
        except ConfigError as e:
            raise AirflowFailException(str(e)) from None

    paths = check_params()

    convert = CerebroSparkSubmitOperator(
        task_id="convert",
        step="convert",
        step_args=["--input", "{{ params.h5_root }}", "--output", "{{ params.dataset_url }}",
                   "--timezone", "{{ params.timezone or '' }}",
                   "--label-map", "{{ (params.label_map | tojson) if params.label_map else '' }}"],
        xcom_keys=CONVERT_XCOM,
    )

    @task.branch
    def plan(report: dict, params: dict | None = None, dag_run=None, data_interval_start=None,
             data_interval_end=None, ti=None) -> list[str]:
        """What this run trains and predicts (docstring of this file); `split` and/or `predict`, or
        neither when there is nothing to do. The decision goes to XCom as `plan`."""
        from airflow.sdk.exceptions import AirflowFailException

        from cerebro_tasks.errors import ConfigError
        from cerebro_tasks.jobs.plan import plan_run

        try:
            decided = plan_run(params or {}, run_type=getattr(dag_run, "run_type", "manual"),
                               interval=(data_interval_start, data_interval_end))
        except ConfigError as e:
            raise AirflowFailException(str(e)) from None
        ti.xcom_push(key="plan", value=decided)
        return decided["branches"]

    planned = plan(convert.output)

    split = CerebroSparkSubmitOperator(
        task_id="split",
        step="split",
        xcom_keys=SPLIT_XCOM,
        step_args=["--dataset", "{{ params.dataset_url }}",
                   "--output", "{{ ti.xcom_pull(task_ids='check_params')['prepared_url'] }}",
                   "--workers", "{{ params.num_workers }}", "--seed", "{{ params.split_seed }}",
                   "--val-fraction", "{{ params.val_fraction }}",
                   "--as-of", "{{ ti.xcom_pull(task_ids='plan', key='plan')['data_as_of'] or '' }}"],
    )

    train = MOPTrainingOperator(
        task_id="train",
        config="{{ ti.xcom_pull(task_ids='check_params')['train_config'] }}",
        run_id="{{ ti.xcom_pull(task_ids='check_params')['run_id'] }}",
        gpus_per_worker="{{ params.gpus_per_worker }}",
        max_active_tis_per_dag=1,  # one training at a time on the Spark cluster, also across backfill runs
    )

    @task
    def export(result: dict, params: dict | None = None, ti=None) -> dict:
        """Publish the best model (.keras + SavedModel + metadata); LATEST moves only forward."""
        from cerebro_tasks.deeppostures.export import export_best

        p = params or {}
        return export_best(result["run_url"], p["export_url"], top_k=p["ensemble_k"],
                           as_of=ti.xcom_pull(task_ids="plan", key="plan")["as_of"])

    exported = export(train.output)

    # this run's model when it trained, else the model in force that `plan` found
    predict = CerebroSparkSubmitOperator(
        task_id="predict",
        step="predict",
        trigger_rule="none_failed_min_one_success",  # also when plan skipped the training branch
        step_args=["--dataset", "{{ params.dataset_url }}",
                   "--model", "{{ (ti.xcom_pull(task_ids='export') or ti.xcom_pull(task_ids='plan', key='plan'))['export_url'] }}",
                   "--predictions", "{{ params.predictions_url }}",
                   "--model-name", "{{ ti.xcom_pull(task_ids='plan', key='plan')['model_name'] or ti.xcom_pull(task_ids='check_params')['model_name'] }}",
                   "--padding", "{{ params.padding }}",
                   "{{ '--output-label' if params.output_label else '--no-output-label' }}",
                   "{{ '--no-segment' if params.no_segment else '--segment' }}",
                   "--which", "{{ ti.xcom_pull(task_ids='plan', key='plan')['which'] }}",
                   "--as-of", "{{ ti.xcom_pull(task_ids='plan', key='plan')['data_as_of'] or '' }}",
                   "--since", "{{ ti.xcom_pull(task_ids='plan', key='plan')['since'] or '' }}"],
    )

    paths >> convert >> planned >> split >> train
    exported >> predict
    planned >> predict
