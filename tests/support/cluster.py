"""A real Spark standalone cluster on this machine: one master and N workers, for tests and trials.

    with standalone_cluster(workers=2, gpus_per_worker=1) as cluster:
        spark = get_spark(master=cluster.master_url, conf=cluster.app_conf())

It runs the installed pyspark's own daemons (`bin/spark-class ...deploy.master.Master` and
`...deploy.worker.Worker`, the classes that `sbin/start-master.sh` starts on a real cluster; the
pip package ships no `sbin/start-*.sh`), so the application talks to a real master over RPC, and
real executors are launched by real workers, each in its own JVM, exactly as on a cluster of
machines. Everything binds to 127.0.0.1 on free ports, and every process is stopped on the way
out, whatever happens (its whole process group: worker, executors and their Python workers).

GPUs: with `gpus_per_worker > 0` every worker declares `spark.worker.resource.gpu.amount` and a
discovery script. Without real GPUs the script is `scripts/fake-gpu-discovery`, which reports the
addresses in `$CEREBRO_FAKE_GPU_ADDRESSES`; each worker gets its own addresses because Spark
(3.1+) no longer coordinates resources between workers of one host, so overlapping addresses
would hand the same "GPU" to two executors.

Run `python -m tests.support.cluster --gpus-per-worker 1` to keep one up by hand (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from tests.support.procs import live_processes

__all__ = ["ClusterError", "StandaloneCluster", "standalone_cluster", "spark_home", "FAKE_GPU_ENV"]

# The variable scripts/fake-gpu-discovery reads: comma-separated addresses, e.g. "0,1".
FAKE_GPU_ENV = "CEREBRO_FAKE_GPU_ADDRESSES"

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FAKE_SCRIPT = os.path.join(_REPO_ROOT, "scripts", "fake-gpu-discovery")

# A copy of scripts/fake-gpu-discovery for installs without the repository's scripts/ folder.
_FAKE_SCRIPT_TEXT = """#!/bin/sh
# Spark resource discovery with fake addresses (written by tests.support.cluster).
set -euf
out=""
for a in $(printf '%s' "${CEREBRO_FAKE_GPU_ADDRESSES:-}" | tr ',' ' '); do
  out="${out:+$out,}\\"$a\\""
done
printf '{"name":"%s","addresses":[%s]}\\n' "${CEREBRO_FAKE_RESOURCE_NAME:-gpu}" "$out"
"""


class ClusterError(RuntimeError):
    """The cluster did not come up (the message carries the tail of the daemons' logs)."""


def spark_home() -> str:
    """The Spark distribution to run: ``$SPARK_HOME`` if set, else the installed pyspark package.

    pyspark's package folder is a complete Spark (bin/, jars/), so the cluster runs exactly the
    Spark version the driver uses (mixing versions between driver and cluster breaks the RPC).
    """
    from pyspark.find_spark_home import _find_spark_home

    home = _find_spark_home()
    if not os.path.exists(os.path.join(home, "bin", "spark-class")):
        raise ClusterError(f"{home} has no bin/spark-class; set SPARK_HOME to a Spark distribution")
    return home


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (someone may take it before the master binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class _Daemon:
    name: str
    proc: subprocess.Popen
    log_path: str

    def tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


@dataclass
class StandaloneCluster:
    """A running local cluster: where it is and what an application needs to use it."""

    master_url: str  # spark://127.0.0.1:PORT
    web_url: str  # the master's web UI; /json/ is its state
    host: str
    workers: int
    cores_per_worker: int
    memory_per_worker: str
    gpus_per_worker: int
    discovery_script: str | None  # what the workers run to find their GPUs
    gpu_addresses: list[list[str]]  # per worker, the addresses its discovery script reports
    work_dir: str
    _daemons: list[_Daemon] = field(default_factory=list, repr=False)

    def state(self) -> dict[str, Any]:
        """The master's view (workers, their resources, running and finished applications)."""
        with urllib.request.urlopen(f"{self.web_url}/json/", timeout=5) as r:
            return json.load(r)

    def app_conf(self, *, executor_memory: str = "512m", gpus_per_task: int | None = None) -> dict[str, str]:
        """Spark settings for an application that takes the whole cluster: one executor per worker.

        One task per executor (``spark.task.cpus`` = executor cores) is what a MOP worker wants:
        it owns the executor's cores and, with GPUs, its GPU(s). The barrier stage needs all its
        tasks placed at once, so the application waits until every executor registered
        (``minRegisteredResourcesRatio`` 1) instead of failing its first slot check.
        """
        gpus = self.gpus_per_worker if gpus_per_task is None else gpus_per_task
        conf = {
            "spark.master": self.master_url,
            "spark.driver.host": self.host,  # executors and MOP workers call the driver back here
            "spark.driver.bindAddress": self.host,
            "spark.executor.cores": str(self.cores_per_worker),
            "spark.task.cpus": str(self.cores_per_worker),
            "spark.executor.memory": executor_memory,
            "spark.cores.max": str(self.workers * self.cores_per_worker),
            "spark.scheduler.minRegisteredResourcesRatio": "1.0",
            "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s",
            # a barrier stage that finds too few slots retries its check at this interval (15 s default)
            "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "1s",
        }
        if gpus:
            conf["spark.executor.resource.gpu.amount"] = str(self.gpus_per_worker)
            conf["spark.task.resource.gpu.amount"] = str(gpus)
            if self.discovery_script:
                # standalone executors get their addresses from the worker; YARN and Kubernetes
                # executors run this script themselves, so a portable configuration names it
                conf["spark.executor.resource.gpu.discoveryScript"] = self.discovery_script
        return conf

    def write_spark_defaults(self, conf_dir: str, **kwargs: Any) -> str:
        """Write ``conf_dir/spark-defaults.conf`` with :meth:`app_conf` (minus the master).

        Point ``SPARK_CONF_DIR`` at it and every ``spark-submit`` (Airflow's operators included)
        uses this cluster's resources; the master itself comes from the Airflow connection.
        """
        os.makedirs(conf_dir, exist_ok=True)
        path = os.path.join(conf_dir, "spark-defaults.conf")
        with open(path, "w") as f:
            for key, value in sorted(self.app_conf(**kwargs).items()):
                if key != "spark.master":
                    f.write(f"{key} {value}\n")
        return path

    def logs(self, lines: int = 25) -> str:
        """The tail of every daemon's log, for failure messages."""
        return "\n".join(f"--- {d.name} ({d.log_path})\n{d.tail(lines)}" for d in self._daemons)


@contextmanager
def standalone_cluster(workers: int = 2, cores_per_worker: int = 1, memory_per_worker: str = "1g",
                       gpus_per_worker: int = 0, fake_gpu_addresses: Sequence[Sequence[str]] | None = None,
                       discovery_script: str | None = None, host: str = "127.0.0.1",
                       work_dir: str | None = None, start_timeout_s: float = 120.0,
                       daemon_memory: str = "256m") -> Iterator[StandaloneCluster]:
    """Start a master and ``workers`` workers, wait until all registered, yield, stop them all.

    :param gpus_per_worker: GPUs each worker offers (0: none).
    :param fake_gpu_addresses: per worker, the fake addresses to report; default worker i gets
        ``[i*g, ..., i*g+g-1]`` (distinct across workers). Ignored with ``discovery_script``.
    :param discovery_script: a real discovery script (e.g. docker/gpu-discovery.sh with
        nvidia-smi) instead of the fake one.
    :param work_dir: where logs, configuration and executor folders go (default: a temporary
        folder, removed afterwards; a given one is kept).
    :param daemon_memory: heap of the master and worker JVMs (they only do bookkeeping).
    """
    if workers < 1 or cores_per_worker < 1 or gpus_per_worker < 0:
        raise ValueError("workers and cores_per_worker must be >= 1, gpus_per_worker >= 0")
    own_dir = work_dir is None
    root = tempfile.mkdtemp(prefix="cerebro-cluster-") if own_dir else os.path.abspath(work_dir)
    daemons: list[_Daemon] = []
    stop = _stopper(daemons)
    atexit.register(stop)  # an interpreter leaving without closing the context still cleans up
    try:
        home = spark_home()
        conf_dir = os.path.join(root, "conf")
        log_dir = os.path.join(root, "logs")
        os.makedirs(conf_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        env = _daemon_env(home, conf_dir, host, daemon_memory)

        addresses: list[list[str]] = [[] for _ in range(workers)]
        script = None
        if gpus_per_worker:
            script = discovery_script or _fake_script(root)
            if discovery_script is None:
                addresses = ([list(map(str, a)) for a in fake_gpu_addresses] if fake_gpu_addresses is not None else
                             [[str(i * gpus_per_worker + j) for j in range(gpus_per_worker)] for i in range(workers)])
                if len(addresses) != workers or any(len(a) != gpus_per_worker for a in addresses):
                    raise ValueError(f"fake_gpu_addresses needs {workers} lists of {gpus_per_worker} addresses")

        worker_conf = os.path.join(conf_dir, "worker.conf")
        with open(worker_conf, "w") as f:
            if gpus_per_worker:
                f.write(f"spark.worker.resource.gpu.amount {gpus_per_worker}\n")
                f.write(f"spark.worker.resource.gpu.discoveryScript {script}\n")
        with open(os.path.join(conf_dir, "master.conf"), "w") as f:
            # a port taken between free_port() and the bind fails the master at once (then we pick
            # new ports) instead of moving to the next port, where the workers would not find it
            f.write("spark.port.maxRetries 0\n")

        for attempt in range(1, 4):
            master_url = f"spark://{host}:{free_port(host)}"
            web_url = f"http://{host}:{free_port(host)}"
            # the workers start beside the master (each JVM takes seconds to boot) and retry
            # their registration until the master is up
            daemons.append(_spawn("master", [
                os.path.join(home, "bin", "spark-class"), "org.apache.spark.deploy.master.Master",
                "--host", host, "--port", master_url.rsplit(":", 1)[1], "--webui-port", web_url.rsplit(":", 1)[1],
                "--properties-file", os.path.join(conf_dir, "master.conf")], env, log_dir))
            for i in range(workers):
                wenv = dict(env)
                if gpus_per_worker and discovery_script is None:
                    wenv[FAKE_GPU_ENV] = ",".join(addresses[i])  # the discovery script inherits this
                wdir = os.path.join(root, f"worker-{i}")
                os.makedirs(wdir, exist_ok=True)
                daemons.append(_spawn(f"worker-{i}", [
                    os.path.join(home, "bin", "spark-class"), "org.apache.spark.deploy.worker.Worker",
                    "--host", host, "--port", "0", "--webui-port", "0", "--cores", str(cores_per_worker),
                    "--memory", memory_per_worker, "--work-dir", wdir, "--properties-file", worker_conf,
                    master_url], wenv, log_dir))
            cluster = StandaloneCluster(master_url=master_url, web_url=web_url, host=host, workers=workers,
                                        cores_per_worker=cores_per_worker, memory_per_worker=memory_per_worker,
                                        gpus_per_worker=gpus_per_worker, discovery_script=script,
                                        gpu_addresses=addresses, work_dir=root, _daemons=daemons)
            try:
                _wait_for_workers(cluster, daemons, start_timeout_s)
                break
            except _PortTaken:
                if attempt == 3:
                    raise ClusterError(f"the master could not bind a free port 3 times:\n{cluster.logs()}")
                stop()  # and again, on new ports
        yield cluster
    finally:
        stop()
        atexit.unregister(stop)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _daemon_env(home: str, conf_dir: str, host: str, daemon_memory: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SPARK_HOME": home,
        "SPARK_CONF_DIR": conf_dir,  # our own (empty) conf folder: no site spark-defaults leaks in
        "SPARK_LOCAL_IP": host,  # RPC and web UIs bind to loopback only
        "SPARK_DAEMON_MEMORY": daemon_memory,
        "SPARK_NO_DAEMONIZE": "1",
    })
    # a driver-side gateway variable would make executors' Python believe it is a driver
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("PYSPARK_GATEWAY_SECRET", None)
    return env


def _fake_script(root: str) -> str:
    if os.access(_FAKE_SCRIPT, os.X_OK):
        return _FAKE_SCRIPT
    path = os.path.join(root, "conf", "fake-gpu-discovery")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(_FAKE_SCRIPT_TEXT)
    os.chmod(path, 0o755)
    return path


class _PortTaken(ClusterError):
    """The master lost a race for the port picked for it."""


def _wait_for_workers(cluster: StandaloneCluster, daemons: list[_Daemon], timeout_s: float) -> None:
    """Until the master lists every worker ALIVE with its cores and GPUs."""
    deadline = time.time() + timeout_s
    last = "no answer"
    while time.time() < deadline:
        for d in daemons:
            if d.proc.poll() is not None:
                if d.name == "master" and "BindException" in d.tail(200):
                    raise _PortTaken(d.tail())
                raise ClusterError(f"{d.name} exited with {d.proc.returncode}:\n{cluster.logs()}")
        try:
            state = cluster.state()
        except OSError as e:
            last = str(e)
        else:
            alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
            ready = [w for w in alive if w.get("cores") == cluster.cores_per_worker and
                     len(w.get("resources", {}).get("gpu", {}).get("addresses", [])) == cluster.gpus_per_worker]
            if len(ready) >= cluster.workers:
                return
            last = f"{len(alive)} alive, {len(ready)} with their resources"
        time.sleep(0.3)
    raise ClusterError(f"workers did not register within {timeout_s:.0f} s ({last}):\n{cluster.logs()}")


def _spawn(name: str, cmd: list[str], env: dict[str, str], log_dir: str) -> _Daemon:
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(log_path, "wb") as log:  # a retry on new ports starts a fresh log
        # own session = own process group: the daemon, the executors it launches and their Python
        # workers can all be signalled at once, and a Ctrl-C in the terminal reaches us, not them
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_pdeathsig_hook())
    return _Daemon(name, proc, log_path)


def _pdeathsig_hook():
    """Linux: a function that makes the calling process get SIGKILL when its parent dies.

    Used as `preexec_fn` (it runs in the child between fork and exec, and the setting survives
    spark-class's `exec java`), so a daemon never outlives a test run killed by SIGKILL. libc is
    loaded here, in the parent: importing in a freshly forked child can deadlock. (The setting
    follows the starting *thread*: start a cluster from a thread that outlives it.)
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


def _stopper(daemons: list[_Daemon]):
    def stop() -> None:
        """Workers first (their executors go with them), then the master; TERM, then KILL."""
        for d in reversed(daemons):
            _signal_group(d.proc, signal.SIGTERM)
        deadline = time.time() + 10
        for d in reversed(daemons):
            try:
                d.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for d in daemons:
            # also whatever is left of the group (an executor whose worker already exited)
            _signal_group(d.proc, signal.SIGKILL)
            try:
                d.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # a killed JVM takes a moment to be torn down (longer on a loaded machine): stop returns
        # when nothing of any group is left running
        deadline = time.time() + 10
        while time.time() < deadline and any(group_alive(d.proc.pid) for d in daemons):
            time.sleep(0.05)
        daemons.clear()

    return stop


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group `pgid` (Linux /proc)."""
    return any(p.pgid == pgid for p in live_processes())


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # pgid == pid: started with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Start a local cluster and keep it up until Ctrl-C; prints the master URL and settings."""
    p = argparse.ArgumentParser(prog="python -m tests.support.cluster", description=main.__doc__)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cores-per-worker", type=int, default=1)
    p.add_argument("--memory-per-worker", default="1g")
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--discovery-script", help="a real GPU discovery script (default: fake addresses)")
    p.add_argument("--conf-dir", help="also write spark-defaults.conf here (use as SPARK_CONF_DIR)")
    args = p.parse_args(argv)
    # stop cleanly on TERM too, and on INT even when started in the background (where the shell
    # leaves SIGINT ignored): the context manager then stops every daemon and removes its folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with standalone_cluster(workers=args.workers, cores_per_worker=args.cores_per_worker,
                            memory_per_worker=args.memory_per_worker, gpus_per_worker=args.gpus_per_worker,
                            discovery_script=args.discovery_script) as cluster:
        print(f"master {cluster.master_url}  web UI {cluster.web_url}", flush=True)
        print(json.dumps(cluster.app_conf(), indent=1), flush=True)
        if args.conf_dir:
            print(f"wrote {cluster.write_spark_defaults(args.conf_dir)}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
