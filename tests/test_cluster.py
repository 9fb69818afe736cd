"""MOP on a real Spark standalone cluster (master + 2 workers on 127.0.0.1) with GPU scheduling.

The cluster is the installed pyspark's own master and worker daemons (tests.support.cluster);
each worker declares one GPU through scripts/fake-gpu-discovery, so Spark's real resource
scheduling hands each MOP worker task its own address. The search itself runs in a fresh Python
(one SparkContext per process: this test session may already hold a local one), once against the
cluster and once in local mode, and the results are compared.

What "the same results" can mean: MOP fixes *what* is computed (every model trains each epoch on
every partition once, then is validated on every partition) but not the *order* in which a model
visits the partitions: that follows which worker is free first, i.e. timing, which differs between
any two runs. A unit's numbers depend on the model, its seed, and the partitions it trained on
before, in order. So the tests assert:

* the same search (models, epochs, metric names, sample counts, each unit exactly once) in both;
* every unit that both runs computed from the same history gives the same numbers;
* the strongest check: every unit the cluster computed is recomputed locally, in-process and
  outside Spark, in the cluster's own order, and must match within float tolerance. That shows
  the cluster computes what local execution computes, unit by unit, not merely "something close".

Run as a script, this file is also the job the tests start in a subprocess (see `_job`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
SEED = 1
NUM_WORKERS = 2
# The search both runs do: 2 models x 2 epochs x 2 partitions, train + val = 16 units, each model
# hopping between the two workers (tests/test_mop_runtime.py covers the scheduling itself).
WORKLOAD_KW = {"rows_per_partition": 512, "features": 16}
MODELS = [("m0", 3e-2), ("m1", 1e-2)]
EPOCHS = 2
RTOL, ATOL = 1e-5, 1e-6  # float32 training on CPU, single-threaded: identical up to rounding


# ------------------------------------------------------------------------------------------------
# The job (runs in a subprocess: python tests/test_cluster.py --master ... --out ...)
# ------------------------------------------------------------------------------------------------
def _specs() -> list[Any]:
    from cerebro_tasks.mop.workload import ModelSpec

    return [ModelSpec(mid, {"lr": lr, "hidden": 8}, EPOCHS, seed=i) for i, (mid, lr) in enumerate(MODELS)]


def _unit_key(unit: dict[str, Any], paths: dict[str, list[int]]) -> str:
    """A unit named by what determines its numbers: model, kind, epoch, partition, and the
    partitions its model trained on before it (in order)."""
    before = paths[unit["model_id"]][:unit["step"]]
    return f"{unit['model_id']}|{unit['kind']}|e{unit['epoch']}|p{unit['partition']}|after{before}"


def _train_paths(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per model, the partition of each train step, in step order."""
    paths: dict[str, list[int]] = {}
    for r in sorted((r for r in records if r["unit"]["kind"] == "train"), key=lambda r: r["unit"]["step"]):
        paths.setdefault(r["unit"]["model_id"], []).append(r["unit"]["partition"])
    return paths


def _replay(records: list[dict[str, Any]], run_url: str) -> dict[str, dict[str, float]]:
    """Recompute every unit of `records` in this process, without Spark, in the same order per model."""
    from cerebro_tasks.mop.scheduler import Unit
    from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
    from cerebro_tasks.mop.worker import UnitRunner, configure_devices
    from cerebro_tasks.storage.layout import checkpoint_name
    from cerebro_tasks.storage.store import Store

    configure_devices([], 1)  # as a MOP worker with one core: same thread counts, same arithmetic
    workload = SyntheticWorkload(**WORKLOAD_KW)
    store = Store(run_url)
    runners = {p: UnitRunner(workload, store, p) for p in range(NUM_WORKERS)}
    paths = _train_paths(records)
    out: dict[str, dict[str, float]] = {}
    for spec in _specs():
        units = sorted((r["unit"] for r in records if r["unit"]["model_id"] == spec.model_id),
                       key=lambda u: (u["step"], u["kind"] == "val", u["partition"]))
        for u in units:  # train steps in order; each epoch's val units once its training is done
            result = runners[u["partition"]].run(Unit.from_dict(u), spec, "replay")
            if u["kind"] == "train":  # accepted, as the driver accepts a unit: the next one reads it
                step = u["step"] + 1
                store.move(checkpoint_name(spec.model_id, step, "replay"), checkpoint_name(spec.model_id, step))
            out[_unit_key(u, paths)] = result["metrics"]
    return out


def _job(argv: list[str]) -> int:
    """Run the search once on `--master` and write what the tests check to `--out`."""
    p = argparse.ArgumentParser()
    p.add_argument("--master", required=True)
    p.add_argument("--conf", default="{}", help="Spark settings, JSON")
    p.add_argument("--run-url", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--replay", action="store_true", help="also recompute every unit in-process")
    args = p.parse_args(argv)

    t0 = time.time()
    from cerebro_tasks.mop.runtime import run_mop
    from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload
    from cerebro_tasks.spark_session import get_spark

    spark = get_spark("cerebro-cluster-test", master=args.master, conf=json.loads(args.conf))
    sc = spark.sparkContext
    t1 = time.time()
    result = run_mop(spark, SyntheticWorkload(**WORKLOAD_KW), _specs(), args.run_url, num_workers=NUM_WORKERS,
                     seed=SEED)
    t2 = time.time()
    info = {"master": sc.master, "app_id": sc.applicationId, "app_name": sc.appName}
    spark.stop()
    paths = _train_paths(result.records)
    out = {
        **info,
        "session_s": t1 - t0,
        "search_s": t2 - t1,
        "mop_wall_s": result.wall_s,
        "workers": result.workers,
        "histories": result.histories,
        "failed_models": result.failed_models,
        "records": [{"unit": r["unit"], "metrics": r["metrics"], "num_samples": r["num_samples"],
                     "worker_id": r["worker_id"], "worker": r["worker"], "key": _unit_key(r["unit"], paths)}
                    for r in result.records],
    }
    if args.replay:
        t3 = time.time()
        out["replay"] = _replay(result.records, args.run_url + "-replay")
        out["replay_s"] = time.time() - t3
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    return 0


def run_job(master: str, conf: dict[str, str], tmp: str, name: str, *, replay: bool = False,
            timeout: float = 300) -> dict[str, Any]:
    """Start the job in a fresh Python and return what it wrote."""
    out = os.path.join(tmp, f"{name}.json")
    cmd = [PYTHON, os.path.abspath(__file__), "--master", master, "--conf", json.dumps(conf),
           "--run-url", os.path.join(tmp, f"{name}-run"), "--out", out] + (["--replay"] if replay else [])
    env = dict(os.environ, PYSPARK_PYTHON=PYTHON, PYSPARK_DRIVER_PYTHON=PYTHON, TF_CPP_MIN_LOG_LEVEL="2")
    for k in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "SPARK_CONF_DIR"):
        env.pop(k, None)  # a fresh driver with its own JVM, not the test session's
    started = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(out) as f:
        data = json.load(f)
    data["process_s"] = time.time() - started
    return data


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A standalone master + 2 workers with 1 core, 1 fake GPU ("0" and "1") each; stopped after."""
    from tests.support.cluster import group_alive, standalone_cluster

    started = time.time()
    with standalone_cluster(workers=NUM_WORKERS, cores_per_worker=1, memory_per_worker="1g",
                            gpus_per_worker=1) as c:
        c.startup_s = time.time() - started  # type: ignore[attr-defined]
        groups = [d.proc.pid for d in c._daemons]
        yield c
    # every process the cluster started is gone: daemons, executors, their Python workers
    assert not [g for g in groups if group_alive(g)], "cluster processes survived the cluster"


def test_cluster_stops_whatever_happens(monkeypatch, tmp_path):
    """A start that fails (here: workers cannot register in 0.5 s) still stops what it started."""
    from tests.support import cluster as cl

    spawned: list[int] = []
    spawn = cl._spawn

    def spy(*args: Any, **kwargs: Any) -> Any:
        daemon = spawn(*args, **kwargs)
        spawned.append(daemon.proc.pid)
        return daemon

    monkeypatch.setattr(cl, "_spawn", spy)
    with pytest.raises(cl.ClusterError, match="did not register"):
        with cl.standalone_cluster(workers=1, start_timeout_s=0.5, work_dir=str(tmp_path)):
            pass  # pragma: no cover
    assert len(spawned) == 2 and not [g for g in spawned if cl.group_alive(g)]
    assert os.path.exists(tmp_path / "logs" / "master.log")  # a given work_dir is kept, logs and all


@pytest.fixture(scope="module")
def cluster_run(cluster, tmp_path_factory) -> dict[str, Any]:
    tmp = str(tmp_path_factory.mktemp("cluster-run"))
    data = run_job(cluster.master_url, cluster.app_conf(executor_memory="512m"), tmp, "cluster", replay=True)
    data["master_state"] = cluster.state()  # after the application ended
    return data


@pytest.fixture(scope="module")
def local_run(cluster_run, tmp_path_factory) -> dict[str, Any]:
    # after the cluster run, not beside it: both time the same search on the same 2 cores
    tmp = str(tmp_path_factory.mktemp("local-run"))
    return run_job("local[2]", {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"},
                   tmp, "local")


def test_cluster_runs_real_daemons_with_gpus(cluster):
    state = cluster.state()
    assert state["status"] == "ALIVE" and state["url"] == cluster.master_url
    workers = [w for w in state["workers"] if w["state"] == "ALIVE"]
    assert len(workers) == 2 and all(w["host"] == "127.0.0.1" and w["cores"] == 1 for w in workers)
    assert sorted(w["resources"]["gpu"]["addresses"][0] for w in workers) == ["0", "1"]
    # separate JVMs: the master and one per worker, all alive
    assert len({d.proc.pid for d in cluster._daemons}) == 3
    assert all(d.proc.poll() is None for d in cluster._daemons)


def test_job_went_through_the_master(cluster_run):
    assert cluster_run["master"].startswith("spark://127.0.0.1:")
    apps = {a["id"]: a for a in cluster_run["master_state"]["completedapps"]}
    assert cluster_run["app_id"] in apps, "the master never saw the application"
    app = apps[cluster_run["app_id"]]
    assert app["name"] == "cerebro-cluster-test" and app["cores"] == 2
    assert app["state"] == "FINISHED"


def test_each_worker_task_got_its_own_gpu_and_pinned_it(cluster_run):
    workers = cluster_run["workers"]
    assert sorted(w["partition"] for w in workers) == [0, 1]
    addresses = [w["gpu_addresses"] for w in workers]
    assert all(len(a) == 1 for a in addresses), addresses
    assert sorted(a[0] for a in addresses) == ["0", "1"]  # distinct: Spark gave each task its own
    for w in workers:
        assert w["cuda_visible_devices"] == ",".join(w["gpu_addresses"])  # TF pinned to it
        assert w["backend_gpus"] == []  # fake addresses: no CUDA device behind them, TF runs on CPU
    assert len({w["pid"] for w in workers}) == 2  # two executors' Python workers, not one process
    # and both really worked: models hopped between them
    assert {r["worker_id"].split(".")[0] for r in cluster_run["records"]} == {"p0", "p1"}


def test_the_search_completes(cluster_run):
    assert cluster_run["failed_models"] == []
    seen = Counter((r["unit"]["model_id"], r["unit"]["epoch"], r["unit"]["kind"], r["unit"]["partition"])
                   for r in cluster_run["records"])
    assert len(seen) == len(MODELS) * EPOCHS * 2 * NUM_WORKERS and set(seen.values()) == {1}
    for model_id, h in cluster_run["histories"].items():
        assert all(len(v) == EPOCHS and all(math.isfinite(x) for x in v) for v in h.values()), model_id
    assert cluster_run["histories"]["m0"]["val_loss"][-1] < cluster_run["histories"]["m0"]["val_loss"][0]


def test_same_search_as_local_mode(cluster_run, local_run):
    """Same models, epochs, metrics and units; same numbers wherever both computed the same thing."""
    c, l = cluster_run, local_run
    assert set(c["histories"]) == set(l["histories"]) == {m for m, _ in MODELS}
    for model_id in c["histories"]:
        assert set(c["histories"][model_id]) == set(l["histories"][model_id])
        assert {k: len(v) for k, v in c["histories"][model_id].items()} == \
               {k: len(v) for k, v in l["histories"][model_id].items()}

    def units(run: dict[str, Any]) -> dict[tuple, int]:
        return {(r["unit"]["model_id"], r["unit"]["epoch"], r["unit"]["kind"], r["unit"]["partition"]): r["num_samples"]
                for r in run["records"]}

    assert units(c) == units(l)  # the same units over the same data (sample counts included)
    local_by_key = {r["key"]: r["metrics"] for r in l["records"]}
    same_history = [r for r in c["records"] if r["key"] in local_by_key]
    for r in same_history:
        for name, value in r["metrics"].items():
            assert value == pytest.approx(local_by_key[r["key"]][name], rel=RTOL, abs=ATOL), r["key"]
    # a model whose partition order happened to be the same in both runs has the same history
    for model_id in c["histories"]:
        c_order = [r["key"] for r in c["records"] if r["unit"]["model_id"] == model_id]
        if set(c_order) <= set(local_by_key):
            for k, v in c["histories"][model_id].items():
                assert v == pytest.approx(l["histories"][model_id][k], rel=RTOL, abs=ATOL)
    print(f"\nunits computed from the same history in both runs: {len(same_history)}/{len(c['records'])}")


def test_cluster_results_equal_local_recomputation(cluster_run):
    """Every unit the cluster ran, recomputed in one local process in the cluster's order: equal."""
    replay = cluster_run["replay"]
    assert len(replay) == len(cluster_run["records"])
    for r in cluster_run["records"]:
        expected = replay[r["key"]]
        assert set(r["metrics"]) == set(expected)
        for name, value in r["metrics"].items():
            assert value == pytest.approx(expected[name], rel=RTOL, abs=ATOL), (r["key"], name)


def test_report_timings(cluster, cluster_run, local_run, record_property):
    """Not a benchmark (2 shared cores), a record: the same search on the cluster and in local mode."""
    line = (f"standalone cluster: start {cluster.startup_s:.1f} s, session {cluster_run['session_s']:.1f} s, "
            f"search {cluster_run['search_s']:.1f} s | local[2]: session {local_run['session_s']:.1f} s, "
            f"search {local_run['search_s']:.1f} s | in-process recomputation of the cluster's units "
            f"{cluster_run['replay_s']:.1f} s")
    record_property("timings", line)
    print("\n" + line)
    assert cluster_run["search_s"] > 0 and local_run["search_s"] > 0


# A small version of the published search: 2 configurations x 1 epoch on 6 subjects x 2 days x 1 h.
DAG_CONF = {"search_space": {"learning_rate": [0.003, 0.0003], "amp_factor": [0.25], "l2": [0.0001],
                             "window_minutes": [3]},
            "num_epochs": 1, "num_workers": 2, "batch_size": 16, "gpus_per_worker": 1}
DAG_SUBJECTS = 6
_JOINED = re.compile(r"worker p(\d+)\.\d+ joined: partition \d+ on \S+ \(GPUs \['([^']*)'\]\)")


def test_dag_runs_on_the_cluster_through_the_connection(cluster, tmp_path):
    """The unchanged DAG, pointed at the cluster by configuration alone.

    Where Spark runs is the `spark_default` Airflow connection (here from AIRFLOW_CONN_SPARK_DEFAULT,
    the same variable scripts/airflow-env sets to local[2,3] by default); the executors' shape and
    GPUs are the Spark client's configuration (SPARK_CONF_DIR/spark-defaults.conf), as on any
    machine that submits to a cluster; `gpus_per_worker` is a DAG parameter.
    """
    home = tmp_path / "home"
    bin_dir = os.path.dirname(PYTHON)
    before = {a["id"] for a in cluster.state()["completedapps"]}
    synth = subprocess.run([os.path.join(bin_dir, "cerebro-tasks"), "synth", "--out", str(home / "h5"), "--subjects",
                            str(DAG_SUBJECTS), "--days", "2", "--windows-per-day", "360", "--seed", "7"],
                           capture_output=True, text=True, timeout=120)
    assert synth.returncode == 0, synth.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYSPARK_GATEWAY"))}
    env.update({
        "CEREBRO_HOME": str(home),
        "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": cluster.master_url}),
        "SPARK_CONF_DIR": os.path.dirname(cluster.write_spark_defaults(str(tmp_path / "spark-conf"))),
        "DAG_CONF": json.dumps(DAG_CONF),
    })
    script = ("set -e; source scripts/airflow-env; airflow db migrate >/dev/null; "
              "airflow dags test deeppostures_model_selection -c \"$DAG_CONF\"")
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    (tmp_path / "dag.log").write_text(log)
    assert proc.returncode == 0, log[-8000:]
    assert "DagRun Finished" in log and "state=success" in log, log[-4000:]

    # every Spark step was submitted to the cluster's master, and the master ran it
    masters = re.findall(r"Spark-Submit cmd: \S*spark-submit --master (\S+)", log)
    assert masters and set(masters) == {cluster.master_url} and len(masters) == 4, masters
    apps = [a for a in cluster.state()["completedapps"] if a["id"] not in before]
    steps = sorted(a["name"].split("-")[1] for a in apps)  # cerebro-<step>[-<run id>]
    assert steps == ["convert", "mop", "predict", "split"], [a["name"] for a in apps]
    assert all(a["state"] == "FINISHED" for a in apps)
    # the MOP workers of the training step each got their own GPU
    joined = dict(_JOINED.findall(log))
    assert sorted(joined) == ["0", "1"] and sorted(joined.values()) == ["0", "1"], joined
    # and the DAG's outputs are there: the chosen model, exported, and CHAP predictions per subject
    (result,) = list((home / "store" / "runs").glob("*/result.json"))
    summary = json.loads(result.read_text())
    assert summary["models"] == 2 and summary["failed_models"] == [] and math.isfinite(summary["best_value"])
    predictions = list((home / "predictions").glob("*/S*.csv"))
    assert len(predictions) == DAG_SUBJECTS


if __name__ == "__main__":
    sys.exit(_job(sys.argv[1:]))
