"""MOP workers as processes of this machine: the Spark barrier tasks' worker loop, without Spark.

``run_mop(None, ...)`` starts W child Pythons here, each running ``mop/worker.serve`` for one
partition, exactly what each Spark barrier task runs; the driver, scheduler, journal and run store
are the same. It is for one machine with no Spark: a GPU box whose workers share its GPU(s), or a
test of the worker loop. Spark is still what spreads workers over machines.

A barrier stage's semantics are kept: when one worker process dies, the others are stopped and the
job ends, and the driver starts all W again (as Spark restarts a barrier stage), so the units that
were in flight go back to the scheduler. The workload travels to the children with cloudpickle, as
Spark ships it to executors.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import uuid
from typing import IO, Any, Sequence

import cloudpickle

log = logging.getLogger("cerebro_tasks.mop")

_STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LocalWorkerJob:
    """W worker processes, started at once; ``finished`` once all have exited or one has died."""

    def __init__(self, num_workers: int, address: tuple[str, int], secret: bytes, workload: Any, run_url: str,
                 model_cache_mb: float | None = None, gpus: Sequence[str] = ()) -> None:
        """``gpus``: GPU ids handed out to the workers round-robin (two workers and one id share that
        GPU); none: the workers run on CPU, with this machine's cores split between them."""
        self.error: str | None = None
        self.group = f"local-{uuid.uuid4().hex[:12]}"
        self._done = threading.Event()
        cpus = max(1, _usable_cpus() // num_workers)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._procs: list[subprocess.Popen] = []
        self._stderr: dict[int, collections.deque[str]] = {}
        try:
            for partition in range(num_workers):
                assigned = [str(gpus[partition % len(gpus)])] if gpus else []
                args = (address, secret, workload, run_url, partition, assigned, cpus, model_cache_mb, num_workers)
                proc = subprocess.Popen([sys.executable, "-m", "cerebro_tasks.mop.local_workers"], env=env,
                                        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
                self._procs.append(proc)
                self._stderr[partition] = tail = collections.deque(maxlen=40)
                threading.Thread(target=_forward, args=(proc.stderr, tail), daemon=True,
                                 name=f"mop-local-worker-{partition}-stderr").start()
                proc.stdin.write(cloudpickle.dumps(args))
                proc.stdin.close()
        except BaseException:
            self.cancel()
            raise
        self._monitor = threading.Thread(target=self._watch, name="mop-local-workers", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        try:
            while True:
                codes = [p.poll() for p in self._procs]
                died = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
                if died:
                    i = died[0]
                    last = next((line for line in reversed(self._stderr[i]) if line.strip()), "no output")
                    self.error = f"MOP worker process for partition {i} exited with code {codes[i]}: {last.strip()}"
                    log.warning("%s; stopping the other workers (a barrier stage ends together)", self.error)
                    self._terminate()
                    return
                if all(rc == 0 for rc in codes):
                    return
                self._done.wait(0.2)
        finally:
            self._done.set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float) -> None:
        self._done.wait(timeout)

    def cancel(self) -> None:
        self._terminate()

    def _terminate(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:  # a worker stuck in native code ignores SIGTERM
                p.kill()
                p.wait()


def _forward(stream: IO[bytes], tail: collections.deque[str]) -> None:
    """A child's stderr goes on to ours (its logs, a traceback), and its last lines are kept for the error."""
    for raw in stream:
        line = raw.decode(errors="replace")
        tail.append(line)
        sys.stderr.write(line)
    stream.close()


def main() -> None:
    """One worker process: its arguments come pickled on stdin, then it serves units until told to stop."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    address, secret, workload, run_url, partition, gpus, cpus, model_cache_mb, num_workers = cloudpickle.loads(
        sys.stdin.buffer.read())
    from cerebro_tasks.mop.worker import serve

    serve(address, secret, workload, run_url, partition, gpus, cpus, model_cache_mb, num_workers)


if __name__ == "__main__":
    main()
