"""Get (or create) a SparkSession with defaults that work on one small machine and in spark-submit.

Under spark-submit (Airflow's SparkSubmitOperator) the master and resources come from the
submit command and an existing session is reused; by hand and in tests the defaults below apply.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Mapping

__all__ = ["get_spark", "LOCAL_DEFAULTS", "local_task_slots"]

# Only applied when this process creates the session. Why each one:
LOCAL_DEFAULTS: dict[str, str] = {
    "spark.ui.enabled": "false",                 # no port to bind or leak in tests / Airflow workers
    "spark.ui.showConsoleProgress": "false",     # progress bars garble logs; MOP logs its own progress
    "spark.driver.memory": "1g",                 # the driver only plans and collects small reports
    "spark.sql.shuffle.partitions": "8",         # 200 is for clusters; tiny local jobs drown in tasks
    "spark.sql.session.timeZone": "UTC",         # epoch seconds everywhere; never the host's zone
    "spark.python.worker.reuse": "true",         # pay the Python worker start-up once per core
    "spark.driver.extraJavaOptions": "-Dio.netty.tryReflectionSetAccessible=true",  # Arrow on Java 17
    "spark.executor.extraJavaOptions": "-Dio.netty.tryReflectionSetAccessible=true",
}


def get_spark(app_name: str = "cerebro-tasks", master: str | None = None,
              conf: Mapping[str, str] | None = None):
    """The active SparkSession, or a new one.

    ``master`` defaults to ``$SPARK_MASTER`` or ``local[2]``. ``conf`` overrides
    :data:`LOCAL_DEFAULTS`. Python workers run this interpreter (``PYSPARK_PYTHON`` is set to
    ``sys.executable`` unless already set) so executors see the same packages as the driver.
    """
    # py4j logs every connection it closes at INFO, also from atexit after log streams are gone
    logging.getLogger("py4j").setLevel(logging.WARNING)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    _export_project_path()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName(app_name)
    if master or not _submitted():
        builder = builder.master(master or os.environ.get("SPARK_MASTER", "local[2]"))
    settings = dict(LOCAL_DEFAULTS)
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("CEREBRO_SPARK_LOG_LEVEL", "WARN"))
    return spark


_LOCAL_MASTER = re.compile(r"^local(?:\[(\*|\d+)(?:,\s*\d+)?\])?$")


def local_task_slots(master: str) -> int | None:
    """How many tasks a local master runs at once (`local` 1, `local[4]` / `local[4,3]` 4,
    `local[*]` the machine's cores); None for a cluster master, whose slots only the cluster knows.

    MOP's barrier stage needs one slot per worker at once: with fewer it waits, then fails.
    """
    match = _LOCAL_MASTER.match(master.strip())
    if match is None:
        return None
    if match.group(1) is None:
        return 1
    return (os.cpu_count() or 1) if match.group(1) == "*" else int(match.group(1))


def _export_project_path() -> None:
    """Let Python workers import ``cerebro_tasks`` even when it is not pip-installed.

    Local executors inherit the driver's environment (not its ``sys.path``), so the folder
    holding the package goes onto ``PYTHONPATH`` before the JVM starts.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def _submitted() -> bool:
    """True under spark-submit: it starts the JVM first (with the submitted master) and hands the
    Python driver its gateway port, so a master set here would override the submitted one."""
    return "PYSPARK_GATEWAY_PORT" in os.environ
