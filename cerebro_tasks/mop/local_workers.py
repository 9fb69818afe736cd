"""MOP workers as processes of this machine: the Spark barrier tasks' worker loop, without Spark.

``run_mop(None, ...)`` starts W child Pythons here, each running ``mop/worker.serve`` for one
partition, exactly what each Spark barrier task runs; the driver, scheduler, journal and run store
are the same. It is for one machine with no Spark: a GPU box whose workers share its GPU(s), or a
test of the worker loop. Spark is still what spreads workers over machines.

A barrier stage's semantics are kept: when one worker process ends before the driver stops the
workers (a crash, a kill, even a clean exit), the others are stopped and the job ends, and the
driver starts all W again (as Spark restarts a barrier stage), so the units that were in flight go
back to the scheduler. The workload travels to the children with cloudpickle, as Spark ships it to
executors, after the driver's ``sys.path`` (so a workload class from the driver's script folder
imports there too). A child whose driver is gone (killed, even with SIGKILL) exits at once: its
stdin stays open for the driver's lifetime, and its end means the driver's.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import IO, TYPE_CHECKING, Any, Sequence

import cloudpickle

if TYPE_CHECKING:  # the worker module is imported in the children, where it serves
    from cerebro_tasks.mop.worker import WorkerSettings

log = logging.getLogger("cerebro_tasks.mop")

_STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL (one deadline for all W)
# the child's first act: take the driver's import path (a pickled list on stdin), then run main()
_BOOTSTRAP = ("import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
              "from cerebro_tasks.mop.local_workers import main; main()")


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LocalWorkerJob:
    """W worker processes, started at once; ``finished`` once all have exited or one has ended early."""

    def __init__(self, num_workers: int, address: tuple[str, int], secret: bytes, workload: Any, run_url: str,
                 settings: WorkerSettings | None = None, gpus: Sequence[str] = ()) -> None:
        """``gpus``: CUDA device ids of this machine (as nvidia-smi numbers them), handed out to the
        workers round-robin (two workers and one id share that GPU); none: the workers run on CPU,
        with this machine's cores split between them."""
        self.error: str | None = None
        self.group = f"local-{uuid.uuid4().hex[:12]}"
        self._done = threading.Event()
        self._stopping = False  # set by the driver: from now on an exit is expected
        self._cancelled = False
        cpus = max(1, _usable_cpus() // num_workers)
        path = pickle.dumps(list(sys.path))
        self._procs: list[subprocess.Popen] = []
        self._forwarders: list[threading.Thread] = []
        self._stderr: list[collections.deque[str]] = []
        try:
            for partition in range(num_workers):
                assigned = [str(gpus[partition % len(gpus)])] if gpus else []
                try:
                    args = cloudpickle.dumps((address, secret, workload, run_url, partition, assigned, cpus,
                                              settings, num_workers))
                except Exception as e:
                    from cerebro_tasks.mop.runtime import MopError

                    raise MopError(f"the workload ({type(workload).__name__}) cannot be sent to the local worker "
                                   f"processes: cloudpickle failed: {e}") from e
                # the worker sees exactly its GPUs, whatever this process was given
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(assigned)}
                proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", _BOOTSTRAP], env=env,
                                        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
                self._procs.append(proc)
                tail: collections.deque[str] = collections.deque(maxlen=40)
                self._stderr.append(tail)
                forwarder = threading.Thread(target=_forward, args=(proc.stderr, tail), daemon=True,
                                             name=f"mop-local-worker-{partition}-stderr")
                forwarder.start()
                self._forwarders.append(forwarder)
                try:
                    proc.stdin.write(path + args)
                    proc.stdin.flush()  # and keep it open: its end tells the child that the driver is gone
                except BrokenPipeError:  # it died at start: the monitor reports it, with its stderr
                    pass
        except BaseException:
            self.cancel()
            raise
        self._monitor = threading.Thread(target=self._watch, name="mop-local-workers", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        try:
            while True:
                codes = [p.poll() for p in self._procs]
                ended = [i for i, rc in enumerate(codes) if rc is not None]
                if ended and not self._stopping:
                    i = ended[0]
                    if self._cancelled:
                        self.error = "the driver cancelled the workers"
                    else:
                        self._forwarders[i].join(5)  # its last lines may still be in the pipe
                        last = next((line.strip() for line in reversed(self._stderr[i]) if line.strip()), None)
                        self.error = (f"MOP worker process for partition {i} {_exit_reason(codes[i])}"
                                      + (f"; its last stderr line: {last}" if last else "; it wrote nothing to stderr"))
                        log.warning("%s; stopping the other workers (a barrier stage ends together)", self.error)
                    self._terminate()
                    return
                if all(rc is not None for rc in codes):
                    return
                self._done.wait(0.2)
        finally:
            self._close_stdin()
            self._done.set()

    def stopping(self) -> None:
        """The driver is stopping the workers (or tearing down): their exits are no longer failures."""
        self._stopping = True

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float) -> None:
        self._done.wait(timeout)

    def cancel(self) -> None:
        self._cancelled = True
        self._terminate()

    def _terminate(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + _STOP_GRACE_S
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:  # a worker stuck in native code ignores SIGTERM
                p.kill()
                p.wait()
        self._close_stdin()

    def _close_stdin(self) -> None:
        for p in self._procs:
            try:
                p.stdin.close()
            except OSError:
                pass


def _forward(stream: IO[bytes], tail: collections.deque[str]) -> None:
    """A child's stderr goes on to ours (its logs, a traceback), and its last lines are kept for the error."""
    for raw in stream:
        line = raw.decode(errors="replace")
        tail.append(line)
        sys.stderr.write(line)
    stream.close()


def _exit_when_the_driver_is_gone(fd: int) -> None:
    # the raw descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader holds its
    # lock, and the interpreter's shutdown then aborts on it
    while os.read(fd, 1 << 16):
        pass  # EOF: the driver closed its end, or died
    os._exit(0)


def main() -> None:
    """One worker process (after _BOOTSTRAP): its arguments come pickled on stdin, then it serves
    units until told to stop, or until its driver is gone."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    address, secret, workload, run_url, partition, gpus, cpus, settings, num_workers = cloudpickle.load(
        sys.stdin.buffer)
    threading.Thread(target=_exit_when_the_driver_is_gone, args=(sys.stdin.fileno(),), name="driver-watch",
                     daemon=True).start()
    from cerebro_tasks.mop.worker import WorkerSettings, serve

    serve(address, secret, workload, run_url, partition, gpus, cpus, settings or WorkerSettings(), num_workers)
