"""Shared fixtures: one local SparkSession and one tiny generated H5 tree per test session.

Both are session-scoped because they are slow to make (Spark: ~5 s; the tree: ~1 s) and
read-only by contract: a test that changes an H5 tree copies it first (``h5_tree_copy``).
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

# Tiny tree: 4 subjects x 2 days x 120 windows (20 min) per day, about 1 MB of H5 in all.
TINY_SUBJECTS = 4
TINY_DAYS = 2
TINY_WINDOWS_PER_DAY = 120
TINY_SEED = 7


@pytest.fixture(scope="session")
def spark():
    """A local SparkSession: 2 cores, small memory, no UI; stopped at the end of the session."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from cerebro_tasks.spark_session import get_spark

    session = get_spark("cerebro-tests", master="local[2]", conf={
        "spark.driver.memory": "1g",
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
    })
    yield session
    session.stop()


@pytest.fixture(scope="session")
def h5_tree(tmp_path_factory) -> str:
    """``<root>/<subject>/<YYYY-MM-DD>.h5`` for 4 subjects x 2 days x 120 windows. Do not modify."""
    from cerebro_tasks.deeppostures.synth import synthesize

    root = str(tmp_path_factory.mktemp("h5") / "study")
    synthesize(root, subjects=TINY_SUBJECTS, days=TINY_DAYS, seed=TINY_SEED,
               windows_per_day=TINY_WINDOWS_PER_DAY)
    return root


@pytest.fixture
def h5_tree_copy(h5_tree, tmp_path) -> str:
    """A private copy of :func:`h5_tree` that a test may change."""
    root = str(tmp_path / "study")
    shutil.copytree(h5_tree, root)
    return root


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the embedded deployment (scripts/airflow-env) with homes in a temp folder.

    Set before anything imports Airflow (it reads its configuration once, at import), and also
    returned so that subprocesses (`airflow dags test`) get the same.
    """
    home = tmp_path_factory.mktemp("cerebro_home")
    bin_dir = os.path.dirname(sys.executable)
    env = {
        "CEREBRO_HOME": str(home),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(ROOT, "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": os.path.join(ROOT, "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_SPARK_DEFAULT": '{"conn_type": "spark", "host": "local[2,3]"}',
        "PYSPARK_PYTHON": sys.executable,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
    }
    os.environ.update(env)
    plugins = os.path.join(ROOT, "plugins")
    if plugins not in sys.path:  # Airflow puts the plugins folder on sys.path; DagBag tests need it too
        sys.path.insert(0, plugins)
    return dict(os.environ)
