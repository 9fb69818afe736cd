"""Ingest newly arrived DeepPostures H5 files into the windows dataset; announce real changes.

    convert -> announce (emits the `deeppostures_windows` Asset only if the dataset changed)

Runs hourly. The conversion is incremental, and a run with nothing new answers from the manifest
and a file listing without starting Spark, so frequent runs cost next to nothing;
`deeppostures_model_selection` is triggered by the Asset event, whose `extra` says what changed
(dataset version, new subjects, files converted and removed).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowSkipException

from cerebro_assets import DATASET_URL, H5_ROOT, WINDOWS_DATASET
from cerebro_operators import CerebroSparkSubmitOperator

with DAG(
    dag_id="deeppostures_ingest",
    description="Incremental H5 -> Petastorm conversion; emits an Asset event when the dataset changed",
    schedule="@hourly",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={"h5_root": Param(H5_ROOT, type="string", minLength=1),
            "dataset_url": Param(DATASET_URL, type="string", minLength=1),
            # the study as pre-processed (null: as the dataset recorded, else UTC and sitting / not-sitting)
            "timezone": Param(None, type=["null", "string"], minLength=1, description="IANA zone of the pre-processing machine"),
            "label_map": Param(None, type=["null", "object"], minProperties=2, description="class name -> index")},
    tags=["cerebro", "deeppostures"],
    doc_md=__doc__,
) as dag:
    convert = CerebroSparkSubmitOperator(
        task_id="convert",
        step="convert",
        step_args=["--input", "{{ params.h5_root }}", "--output", "{{ params.dataset_url }}",
                   "--timezone", "{{ params.timezone or '' }}",
                   "--label-map", "{{ (params.label_map | tojson) if params.label_map else '' }}"],
        xcom_keys=["dataset_url", "files", "windows", "subjects", "new_subjects", "version", "seconds"],
    )

    @task(outlets=[WINDOWS_DATASET])
    def announce(report: dict, outlet_events=None) -> dict:
        """Skipped (no Asset event) when the run converted or removed nothing; else the event's
        `extra` carries what the conversion did."""
        files = report.get("files", {})
        changed = files.get("converted", 0) + files.get("removed", 0)
        if not changed:
            raise AirflowSkipException("no new, changed or deleted H5 files: nothing to announce")
        extra = {"dataset_version": report.get("version"), "new_subjects": report.get("new_subjects", []),
                 "converted_files": files.get("converted", 0), "removed_files": files.get("removed", 0),
                 "windows": report.get("windows", {}).get("total")}
        outlet_events[WINDOWS_DATASET].extra = extra
        return extra

    announce(convert.output)
