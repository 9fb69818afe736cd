"""A real Airflow 3 deployment on this machine: scheduler, DAG processor and API server on SQLite.

    with airflow_deployment(home, dags_folder=..., plugins_folder=..., env=env) as airflow:
        airflow.cli("backfill", "create", ...)      # migrated, DAGs serialized, nothing running yet
        airflow.start_components()
        airflow.wait_for_runs("deeppostures_model_selection", run_ids, timeout_s=600)

The components are the ones a deployment runs (`airflow scheduler` with the LocalExecutor,
`airflow dag-processor`, `airflow api-server`, which Airflow 3's tasks report to through its
execution API), each in its own process group, bound to 127.0.0.1 on a free port, with a JWT
secret shared between them. Every process is stopped on the way out, whatever happens: SIGTERM to
its whole group (task runners, spark-submit, Spark and its Python workers), SIGKILL after a grace
period. The metadata database is read directly (SQLite, read-only) to follow runs: no API polling
costs, and what is read is what the scheduler wrote.

SQLite has one writer at a time, and a CLI transaction that reads before it writes fails at once
("database is locked") when the scheduler writes in between; so the runs a test needs from the
start are created before the components start, and a later trigger is retried until it is in.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

__all__ = ["AirflowDeployment", "airflow_deployment", "DeploymentError"]

FINISHED = ("success", "failed")


class DeploymentError(RuntimeError):
    """A component did not start, died, or runs did not finish in time; the message has its log."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AirflowDeployment:
    home: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def db_path(self) -> str:
        return os.path.join(self.home, "airflow.db")

    def log(self, name: str, tail: int = 4000) -> str:
        path = os.path.join(self.home, f"{name}.out")
        return open(path, errors="replace").read()[-tail:] if os.path.exists(path) else ""

    def start(self, name: str, *args: str) -> None:
        out = open(os.path.join(self.home, f"{name}.out"), "wb")
        self.procs[name] = subprocess.Popen(["airflow", *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DeploymentError(f"airflow {name} exited with {proc.returncode}:\n{self.log(name)}")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every component's process group, then SIGKILL what is left after `grace_s`."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # the group may outlive its leader (task runners, Spark)
            proc.wait(timeout=10)

    def start_components(self, start_timeout_s: float = 180) -> None:
        port = self.env["AIRFLOW__API__PORT"]
        self.start("api-server", "api-server", "--host", "127.0.0.1", "--port", port, "--workers", "1")
        # tasks report to the API server from their first line: the scheduler starts them once it answers
        self.wait_for("the API server to answer", lambda: _answers(int(port)), start_timeout_s)
        self.start("dag-processor", "dag-processor")
        self.start("scheduler", "scheduler")

    def trigger(self, dag_id: str, run_id: str, conf: dict, attempts: int = 10) -> None:
        """`airflow dags trigger`, again while SQLite is busy with the scheduler's writes."""
        import json

        for attempt in range(attempts):
            try:
                self.cli("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf))
                return
            except DeploymentError as e:
                if "database is locked" not in str(e) or attempt == attempts - 1:
                    raise
                if self.query("SELECT 1 FROM dag_run WHERE dag_id = ? AND run_id = ?", dag_id, run_id):
                    return  # it failed after its run was in
                time.sleep(1.0)

    def cli(self, *args: str, timeout_s: float = 300) -> str:
        proc = subprocess.run(["airflow", *args], env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise DeploymentError(f"airflow {' '.join(args[:3])} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def query(self, sql: str, *params: object) -> list[sqlite3.Row]:
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def wait_for(self, what: str, ready, timeout_s: float, poll_s: float = 2.0):
        """Poll `ready()` until it returns something truthy; fail naming `what` and the logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                value = ready()
            except sqlite3.OperationalError:  # the database is being migrated or written: ask again
                value = None
            if value:
                return value
            time.sleep(poll_s)
        raise DeploymentError(f"timed out after {timeout_s:.0f} s waiting for {what}\n"
                              + "\n".join(f"--- {n}:\n{self.log(n, 2000)}" for n in self.procs))

    def runs(self, dag_id: str) -> list[sqlite3.Row]:
        return self.query("SELECT run_id, run_type, state, logical_date, data_interval_start, data_interval_end "
                          "FROM dag_run WHERE dag_id = ? ORDER BY logical_date", dag_id)

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, sqlite3.Row]:
        rows = self.query("SELECT task_id, state, try_number, start_date, end_date FROM task_instance "
                          "WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return {r["task_id"]: r for r in rows}

    def wait_for_runs(self, dag_id: str, run_ids: Sequence[str], timeout_s: float) -> dict[str, str]:
        """Wait until every run in `run_ids` has finished; their states."""
        def finished():
            states = {r["run_id"]: r["state"] for r in self.runs(dag_id) if r["run_id"] in run_ids}
            return states if len(states) == len(run_ids) and all(s in FINISHED for s in states.values()) else None

        return self.wait_for(f"runs {list(run_ids)} of {dag_id} to finish", finished, timeout_s)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def airflow_deployment(home: str, *, dags_folder: str, plugins_folder: str, env: dict[str, str],
                       parallelism: int = 4) -> Iterator[AirflowDeployment]:
    """Migrate a fresh SQLite database in `home` and serialize the DAGs, yield (the caller then
    calls `start_components`); always stop every component started."""
    os.makedirs(home, exist_ok=True)
    port = _free_port()
    full_env = {
        **env,
        "AIRFLOW_HOME": home,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db?timeout=60",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__DAGS_FOLDER": dags_folder,
        "AIRFLOW__CORE__PLUGINS_FOLDER": plugins_folder,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # the components' log servers (default 8793, 8794): free ports, never another test's
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
    }
    airflow = AirflowDeployment(home=home, env=full_env)
    try:
        airflow.cli("db", "migrate", timeout_s=600)
        airflow.cli("dags", "reserialize", timeout_s=600)
        yield airflow
    finally:
        airflow.stop()


def _answers(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False
