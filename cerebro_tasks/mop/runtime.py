"""The MOP driver: one Spark application, W long-lived barrier workers, models hopping between them.

    driver (this module)                       Spark barrier stage of W tasks (mop/worker.py)
    HopScheduler.assign() ──push unit──────▶   worker p: owns partition p, runs the unit,
    journal + scheduler   ◀──push result───     writes ckpt-<step+1> into the run store

Fault tolerance: when a worker dies, Spark restarts the whole barrier stage, so the units running
on all workers at that moment go back to the scheduler and are re-run from their models' last
checkpoints once workers are back (when Spark gives up, the driver submits the stage again);
finished units are never redone. A unit that hangs (it runs far longer than its
cost says it should) counts as failed, and the driver cancels the stage so Spark's restart takes
its worker back. A
driver that dies is resumed by running again with the same run URL: the journal says which units
are done.

Schedules: ``"lockstep"`` (default) hands results to the scheduler in the order of a virtual
clock (mop/lockstep.py), so the same seed gives the same schedule and the same weights however
long units really take; ``"adaptive"`` hands them on as they arrive, which never holds a worker
back but lets timing noise change the order models visit partitions.

Whole models written behind (mop/worker.py): a unit is accepted once its hop state is committed;
the epoch's ``.keras`` it leaves comes later (a ``saved`` message) and is published then. Until
then the model's state at that step is kept, so that if its writer is lost another worker writes
it from there, and the run ends only when every wanted whole model is in place. Those messages
are not unit events: lockstep's schedule does not see them.

Without Spark (``spark`` None), the W workers are processes of this machine running the same worker
loop (mop/local_workers.py): for one box with GPUs and no cluster.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from cerebro_tasks.mop.control import ControlServer, Message
from cerebro_tasks.mop.journal import Journal, histories, resume_order
from cerebro_tasks.mop.lockstep import Lockstep
from cerebro_tasks.mop.scheduler import VAL_COST_PRIOR, HopScheduler, Unit
from cerebro_tasks.mop.timeline import timeline_figures
from cerebro_tasks.mop.worker import WorkerSettings, barrier_task
from cerebro_tasks.mop.workload import ModelSpec, Workload
from cerebro_tasks.storage.store import Store
from cerebro_tasks.storage import layout
from cerebro_tasks.storage.layout import checkpoint_name, state_name

log = logging.getLogger("cerebro_tasks.mop")

# Called when a model has finished all its units: (model_id, its history) -> more models to train
# (how TPE learns from finished models while workers stay busy).
ModelDoneCallback = Callable[[str, dict[str, list[float]]], "list[ModelSpec] | None"]
# Called when a model has validated an epoch (trained it, without validation): (model_id, 0-based
# epoch, its history so far) -> True to stop the model there (early stopping).
EpochCallback = Callable[[str, int, dict[str, list[float]]], bool]


RUN_LOCK = layout.RUN_LOCK
SCHEDULES = ("lockstep", "adaptive")
# A unit is hung once it runs this many times longer than expected (the slowest observed seconds
# per unit of cost, times its cost), and at least UNIT_TIMEOUT_MIN_S: generous, since a false
# alarm costs a stage restart, and a hang otherwise costs the whole run.
UNIT_TIMEOUT_FACTOR = 10.0
UNIT_TIMEOUT_MIN_S = 60.0
LOCK_HEARTBEAT_S = 30.0
# "needed": delete checkpoints nothing can read any more (see MopDriver._collect_checkpoints);
# "all": keep every checkpoint every accepted train unit wrote
KEEP_CHECKPOINTS = ("needed", "all")
# a whole checkpoint written behind that fails this many times in a row fails its model
MAX_WHOLE_TRIES = 3


class MopError(RuntimeError):
    pass


@dataclass
class MopResult:
    run_url: str
    specs: dict[str, ModelSpec]
    histories: dict[str, dict[str, list[float]]]
    records: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    figures: dict[str, Any]
    wall_s: float
    units_run: int  # units run by this driver (not replayed from the journal)
    failed_models: list[str] = field(default_factory=list)
    # failed model -> {"error": the exception's first line, "traceback": URL of the file holding
    # every failed attempt's full traceback (layout.error_name)}
    failures: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class _Behind:
    """A whole checkpoint being written behind: by which worker under which attempt (both None
    while no live worker has been asked), since when, and how many tries failed."""

    worker_id: str | None
    attempt: str | None
    since: float
    tries: int = 0


class MopDriver:
    """Trains every added model with MOP over `num_workers` partitions; `run()` blocks until done."""

    def __init__(self, spark: Any, workload: Workload, run_url: str, *, num_workers: int, seed: int = 0,
                 max_job_attempts: int = 3, start_timeout_s: float = 600.0, validate: bool = True,
                 lock_wait_s: float = 4 * LOCK_HEARTBEAT_S, schedule: str = "lockstep",
                 unit_timeout_s: float | None = None, model_cache_mb: float | None = None,
                 keep_checkpoints: str = "needed", select: tuple[str | Sequence[str], str] | None = None,
                 local_gpus: Sequence[str] = (), write_behind: bool = True) -> None:
        """``select``: (history key or its aliases, "min" or "max"), the metric the search selects on: the
        checkpoint of each model's best epoch by it is kept (with ``keep_checkpoints="needed"``).

        ``spark`` None runs the W workers as processes of this machine (mop/local_workers.py), with
        ``local_gpus`` (GPU ids) shared out among them round-robin; with Spark, each barrier task's
        GPUs are the ones Spark assigned it.

        ``write_behind``: workers write each epoch's whole model while they wait for their next unit
        (the module docstring); False writes it within the unit, as a bench's baseline."""
        if schedule not in SCHEDULES:
            raise MopError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if isinstance(local_gpus, str) or (spark is not None and local_gpus):
            raise MopError(f"local_gpus={local_gpus!r}: a list of GPU ids, e.g. ['0'], for local workers (spark=None); "
                           "with Spark, each worker's GPUs are the ones Spark assigns its task")
        if model_cache_mb is not None and not model_cache_mb >= 0:
            raise MopError(f"model_cache_mb must be >= 0 (megabytes of warm models per worker), got {model_cache_mb!r}")
        if keep_checkpoints not in KEEP_CHECKPOINTS:
            raise MopError(f"unknown keep_checkpoints {keep_checkpoints!r}; choose one of {KEEP_CHECKPOINTS}")
        if select is not None and select[1] not in ("min", "max"):
            raise MopError(f"select {select!r}: the mode must be 'min' or 'max'")
        self.keep_checkpoints = keep_checkpoints
        self.select = select
        self.spark = spark
        self.local_gpus = tuple(local_gpus)
        self.workload = workload
        self.store = Store(run_url)
        self.num_workers = num_workers
        self.seed = seed
        self.max_job_attempts = max_job_attempts
        self.start_timeout_s = start_timeout_s
        self.lock_wait_s = lock_wait_s
        self.unit_timeout_s = unit_timeout_s  # None: from observed durations (see UNIT_TIMEOUT_FACTOR)
        # model_cache_mb None: each worker derives its budget (mop/model_cache.py)
        self.worker_settings = WorkerSettings(model_cache_mb, write_behind)
        self.journal = Journal(self.store)
        self.scheduler = HopScheduler(num_workers, seed=seed, validate=validate)
        self.schedule = schedule
        self._lockstep = Lockstep(self._unit_cost) if schedule == "lockstep" else None
        # a lost worker or failed unit is not replayed in lockstep: from then on dispatch freely
        self._perturbed = False
        self._dispatched_at: dict[str, float] = {}  # worker -> when its unit in flight was sent
        self._s_per_cost = 0.0  # slowest observed seconds per unit of cost
        self.specs: dict[str, ModelSpec] = {}
        self._conns: dict[str, Connection] = {}
        self._running: dict[str, Unit] = {}
        # worker -> id of the dispatch whose result is not yet accepted (its checkpoint is not yet
        # the model's: storage/layout.checkpoint_name)
        self._attempts: dict[str, str] = {}
        self._worker_info: dict[str, dict[str, Any]] = {}
        self._joins: dict[int, int] = {}  # partition -> workers that joined for it
        self._units_run = 0
        self._records: list[dict[str, Any]] = []
        # the same records by model: per-unit work must not grow with the run (thousands of units)
        self._by_model: dict[str, list[dict[str, Any]]] = {}
        self._completed_models: set[str] = set()
        self._on_epoch: EpochCallback | None = None
        self._stopped_now: list[str] = []  # stopped by the last epoch callback: complete them at once
        # epochs whose training waits for the previous epoch's validation (early stopping decides there)
        self.epoch_gates: tuple[int, ...] = ()
        self._errors: dict[str, list[str]] = {}  # model -> the tracebacks of its failed units, oldest first
        # (model, step) -> its whole checkpoint being written behind (see the module docstring)
        self._behind: dict[tuple[str, int], _Behind] = {}
        self._behind_written = [0, 0.0]  # whole checkpoints written behind: how many, worker seconds
        self._behind_dropped = 0  # whole checkpoints no longer wanted before they were in place
        self._heard: dict[str, float] = {}  # worker -> when it last sent anything
        # attempt -> (worker, its report): written behind a unit whose result lockstep still holds
        self._saved_early: dict[str, tuple[str, dict[str, Any]]] = {}
        # the longest unit, and whole checkpoint write behind, seen (how long a write may take)
        self._slowest_s = 0.0
        self._slowest_write_s: float | None = None
        self._t0 = time.time()
        self._last_idle: str | None = None

    # building the search ---------------------------------------------------------------------------
    def add(self, spec: ModelSpec) -> None:
        if spec.model_id in self.specs:
            raise MopError(f"model id {spec.model_id!r} added twice")
        if not spec.cost > 0:
            raise MopError(f"model {spec.model_id!r}: cost must be > 0, got {spec.cost!r}")
        self.specs[spec.model_id] = spec
        self.scheduler.add_model(spec.model_id, spec.num_epochs, gates=self.epoch_gates)
        self._save_run_spec()

    def _save_run_spec(self) -> None:
        self.store.write_json({"num_workers": self.num_workers, "seed": self.seed,
                               "models": [asdict(s) for s in self.specs.values()]}, layout.RUN)

    def resume(self) -> int:
        """Replay the journal of an earlier attempt of this run; returns the units found done."""
        if not self.store.exists(layout.RUN):
            return 0
        saved = self.store.read_json(layout.RUN)
        if saved["num_workers"] != self.num_workers:
            raise MopError(f"{self.store.url}/run.json: the run was started with num_workers="
                           f"{saved['num_workers']}, this attempt has {self.num_workers}; partitions differ, "
                           "so it cannot resume: use the same number of workers or a new run id")
        for s in saved["models"]:
            if s["model_id"] not in self.specs:
                self.add(ModelSpec(**s))
        self._records = self.journal.records()
        self._by_model = {}
        for r in self._records:
            self._by_model.setdefault(r["unit"]["model_id"], []).append(r)
        for r in resume_order(self._records):
            unit = Journal.unit_of(r)
            if unit.model_id in self.specs:
                self.scheduler.restore_finished(unit)
        if self._records:
            log.info("resuming %s: %d units already done (journal)", self.store.url, len(self._records))
        self._find_missing_wholes()
        return len(self._records)

    def _find_missing_wholes(self) -> None:
        """Whole checkpoints an earlier attempt accepted but did not see written (it stopped while
        they were behind): each is written again from its model's state, kept for that."""
        P = self.num_workers
        lost = []
        for model_id in self.specs:
            wanted = self._wanted(model_id)
            step = self.scheduler.model_status(model_id).step
            names = set(self.store.listdir(layout.MODELS_DIR, model_id))  # one listing, not a call per step
            for s in range(P, step + 1, P):
                if ((wanted is None or s in wanted["keras"]) and checkpoint_name(model_id, s)[-1] not in names
                        and (model_id, s) not in self._behind):
                    if state_name(model_id, s)[-1] in names:
                        self._behind[(model_id, s)] = _Behind(None, None, time.time())
                    else:  # deleted by an earlier attempt that kept fewer (keep_checkpoints)
                        lost.append(f"{model_id} step {s}")
        if self._behind:
            log.info("resuming %s: %d whole checkpoints to write from their states", self.store.url, len(self._behind))
        if lost:
            log.warning("%s: %d whole checkpoints are missing and so are their states, so they cannot be written "
                        "again: %s", self.store.url, len(lost), ", ".join(lost[:10]) + (" ..." if len(lost) > 10 else ""))

    # running -------------------------------------------------------------------------------------
    def run(self, on_model_done: ModelDoneCallback | None = None, on_epoch: EpochCallback | None = None) -> MopResult:
        """Train until every model is done. One driver per run: a second waits, then fails."""
        self._on_epoch = on_epoch
        # a retry that starts while its killed predecessor's lock is fresh waits for it to go stale
        with self.store.lock(RUN_LOCK, wait_s=self.lock_wait_s, heartbeat_s=LOCK_HEARTBEAT_S):
            return self._run(on_model_done)

    def stop(self, model_id: str) -> None:
        """Early-stop a model: its pending units are dropped, so its workers take other models' units
        at once; a unit of it already running finishes and is recorded (its checkpoint is kept)."""
        self.scheduler.stop_model(model_id)
        self._stopped_now.append(model_id)
        log.info("model %s stopped early at step %d", model_id, self.scheduler.model_status(model_id).step)

    def _run(self, on_model_done: ModelDoneCallback | None) -> MopResult:
        server = ControlServer()
        attempts = 0  # consecutive starts of the worker stage that ran no unit (nor wrote a whole model)
        units_at_start = wholes_at_start = 0
        job: WorkerJob | None = None
        self._t0 = time.time()
        self._notify_already_complete(on_model_done)
        try:
            while not self.scheduler.done or self._behind:
                if job is None or (job.finished and not self._conns):
                    if job is not None:
                        log.warning("worker stage ended before the search finished (%s); resubmitting",
                                    job.error or "no error")
                        if self._units_run > units_at_start or self._behind_written[0] > wholes_at_start:
                            attempts = 0  # it made progress: only failures in a row use up the attempts
                    attempts += 1
                    if attempts > self.max_job_attempts:
                        raise MopError(f"the {'Spark' if self.spark is not None else 'local'} worker stage failed "
                                       f"{self.max_job_attempts} times in a row (no unit finished, no whole model was "
                                       f"written in between); "
                                       f"last error: {job.error if job else None}")
                    job = self._start_workers(server)
                    job_started = time.time()
                    units_at_start, wholes_at_start = self._units_run, self._behind_written[0]
                had_workers = bool(self._conns)
                self._accept_joined(server)
                self._ask_behind()
                if not self._conns and time.time() - job_started > self.start_timeout_s:
                    hint = (f"does the cluster have {self.num_workers} free task slots (a barrier stage needs all at "
                            "once)?" if self.spark is not None else "their stderr, above, says why")
                    raise MopError(f"no MOP worker connected within {self.start_timeout_s:.0f} s; {hint}")
                self._dispatch()
                self._explain_idle()
                self._receive(timeout=0.5, on_model_done=on_model_done)
                self._fail_hung_units(job, on_model_done)
                self._fail_hung_writes(job)
                # A failed unit, a lost or superseded worker, a hung unit: each removes a unit that
                # lockstep may have been holding results behind. Release what is now in turn, every
                # pass, so no path that removes work leaves results (and their workers) waiting.
                self._release_in_lockstep(on_model_done)
                if had_workers and not self._conns:
                    job_started = time.time()  # all gone: Spark restarts the stage; time its start afresh
            if self._lockstep and self._units_run:
                log.info("lockstep: %d of %d results came in before their turn and waited for it",
                         self._lockstep.held, self._units_run)
            if job is not None:
                job.stopping()
            for conn in self._conns.values():
                _send_quietly(conn, Message.stop())
            if job is not None:
                job.join(timeout=120)
            for model_id in self.specs:  # the workers are gone: a late write of a stale attempt too
                self._collect_checkpoints(model_id)
        finally:
            if job is not None:
                job.stopping()  # the workers end now, one way or another: not a failure to report
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
            server.close()
            if job is not None and not job.finished:
                # every exit (an error, a start timeout, KeyboardInterrupt, workers that did not
                # stop in time) takes the barrier stage down with it: nothing of the run keeps running
                job.cancel()
                job.join(timeout=15)
                if not job.finished and self.spark is not None:
                    # a barrier job still waiting for W free slots is not started yet, so there is
                    # nothing to cancel; Spark drops it after its slot checks (runs no task of it)
                    log.warning("the MOP worker job %s had not started; Spark gives it up after its slot checks",
                                job.group)
        return self._result()

    def _start_workers(self, server: ControlServer) -> WorkerJob:
        if self.spark is None:
            from cerebro_tasks.mop.local_workers import LocalWorkerJob

            return LocalWorkerJob(self.num_workers, server.address, server.secret, self.workload, self.store.url_of(),
                                  self.worker_settings, self.local_gpus)
        return _BarrierJob(self.spark, self.num_workers, server, self.workload, self.store.url_of(),
                           self.worker_settings)

    def _notify_already_complete(self, on_model_done: ModelDoneCallback | None) -> None:
        # models completed before a resume still count for a search that learns from results (TPE)
        hist = histories(self._records, self.num_workers)
        if self._on_epoch is not None:
            # every epoch validated before the resume, oldest first: the search answers those it
            # decided already from its own record, and decides the rest now
            last = max((len(series) for h in hist.values() for series in h.values()), default=0)
            for epoch in range(last):
                for model_id in list(self.specs):
                    status = self.scheduler.model_status(model_id)
                    if status.state == "running" and self._epoch_closed(status, epoch):
                        self._epoch_done(model_id, epoch, hist.get(model_id, {}))
            self._stopped_now.clear()  # the loop below completes every terminal model
        for model_id in list(self.specs):
            if self.scheduler.model_status(model_id).state in ("done", "stopped", "failed"):
                self._model_complete(model_id, hist.get(model_id, {}), on_model_done)

    def _accept_joined(self, server: ControlServer) -> None:
        while not server.joined.empty():
            conn, hello = server.joined.get()
            partition = hello.payload["partition"]
            for old, info in list(self._worker_info.items()):
                # a new attempt of a partition's task supersedes the old one (Spark restarted the
                # stage): forget the old worker even if its connection has not dropped yet
                if old in self._conns and info["partition"] == partition:
                    self._lose_worker(old)
            self._joins[partition] = self._joins.get(partition, 0) + 1
            worker_id = f"p{partition}.{self._joins[partition]}"  # named by partition: same run, same ids
            self._conns[worker_id] = conn
            self._worker_info[worker_id] = {"partition": partition, **hello.payload["info"]}
            self.scheduler.worker_joined(worker_id, partition)
            log.info("worker %s joined: partition %d on %s (GPUs %s)", worker_id, partition,
                     hello.payload["info"].get("host"), hello.payload["info"].get("gpu_addresses") or "none")

    def _explain_idle(self) -> None:
        idle = self.scheduler.explain_idle() if self._conns else None
        if idle != self._last_idle:
            # fewer models than workers is worth a warning; transient idling while models hop is not
            level = logging.WARNING if len(self.specs) < self.num_workers else logging.DEBUG
            if idle:
                log.log(level, "%s", idle)
            self._last_idle = idle

    def _unit_cost(self, unit: Unit) -> float:
        """A unit's expected duration in its model's cost units (lockstep's clock, hang limits)."""
        cost = float(self.specs[unit.model_id].cost)
        return cost if unit.kind == "train" else cost * VAL_COST_PRIOR

    def _dispatch(self) -> None:
        if self._lockstep and not self._perturbed and len(self.scheduler.workers) < self.num_workers:
            return  # lockstep starts when all W workers are in, so the first picks do not race
        for worker_id, unit in self.scheduler.assign():
            self._running[worker_id] = unit
            self._dispatched_at[worker_id] = time.time()
            self._attempts[worker_id] = attempt = uuid.uuid4().hex[:12]
            if self._lockstep:
                self._lockstep.dispatched(worker_id, unit)
            if not _send_quietly(self._conns[worker_id], Message.unit(unit, self.specs[unit.model_id], attempt)):
                self._lose_worker(worker_id)

    def _receive(self, timeout: float, on_model_done: ModelDoneCallback | None) -> None:
        if not self._conns:
            time.sleep(timeout)
            return
        by_conn = {id(c): w for w, c in self._conns.items()}
        for conn in wait(list(self._conns.values()), timeout=timeout):
            worker_id = by_conn[id(conn)]
            if self._conns.get(worker_id) is not conn:
                continue  # lost earlier in this batch (a failed send, a superseding join): handled once
            try:
                msg: Message = conn.recv()
            except (EOFError, OSError):
                self._lose_worker(worker_id)
                continue
            self._heard[worker_id] = time.time()
            if msg.kind == "saved":  # a whole checkpoint written behind: not a unit event
                self._whole_saved(worker_id, msg.payload, on_model_done)
                continue
            unit = msg.payload["unit"]
            self._running.pop(worker_id, None)
            if msg.kind == "done" and self._lockstep:
                self._lockstep.arrived(worker_id, msg.payload["result"])
                self._release_in_lockstep(on_model_done)
            elif msg.kind == "done":
                result = msg.payload["result"]
                self._unit_done(worker_id, unit, result, result["end"] - result["start"], on_model_done)
            elif msg.kind == "fatal":
                raise MopError(f"{msg.payload['error']} (worker {worker_id}, run {self.store.url})")
            elif msg.kind == "failed":
                self._forget_in_lockstep(worker_id)
                self._unit_failed(worker_id, unit, msg.payload["error"], on_model_done)

    def _unit_limit_s(self, unit: Unit) -> float | None:
        if self.unit_timeout_s is not None:
            return self.unit_timeout_s
        if not self._s_per_cost:
            return None  # nothing observed yet: no basis for calling anything hung
        return max(UNIT_TIMEOUT_MIN_S, UNIT_TIMEOUT_FACTOR * self._s_per_cost * self._unit_cost(unit))

    def _fail_hung_units(self, job: WorkerJob, on_model_done: ModelDoneCallback | None) -> None:
        now = time.time()
        for worker_id, unit in list(self._running.items()):
            limit = self._unit_limit_s(unit)
            ran = now - self._dispatched_at[worker_id]
            if limit is None or ran <= limit:
                continue
            self._running.pop(worker_id, None)
            self._forget_in_lockstep(worker_id)
            # charges a retry (the unit may be at fault) before the worker goes, so the unit is not
            # also put back uncharged
            self._unit_failed(worker_id, unit, f"HungUnitError: unit ran {ran:.0f} s, over its limit of "
                              f"{limit:.0f} s; its worker stage was cancelled so that it starts afresh",
                              on_model_done)
            self._lose_worker(worker_id)
            job.cancel()  # a hung Python worker only goes away with its task

    def _release_in_lockstep(self, on_model_done: ModelDoneCallback | None) -> None:
        # one event, then assign(), then the next: exactly the sequence a simulation would see
        if self._lockstep is None:
            return
        while (ready := self._lockstep.pop_ready()) is not None:
            worker_id, unit, result, duration = ready
            self._unit_done(worker_id, unit, result, duration, on_model_done)
            self._dispatch()

    def _forget_in_lockstep(self, worker_id: str) -> None:
        if self._lockstep:
            self._lockstep.forget(worker_id)
            self._perturbed = True

    def _unit_failed(self, worker_id: str, unit: Unit, error: str, on_model_done: ModelDoneCallback | None) -> None:
        """Charge a failed attempt to its unit; keep the traceback in the run folder."""
        self._attempts.pop(worker_id, None)
        again = self.scheduler.unit_failed(worker_id, unit)
        self._record_error(unit.model_id, f"{unit} on worker {worker_id}", error)
        log.error("unit %s failed on %s (%s): %s; full traceback in %s", unit, worker_id,
                  "it will run again" if again else f"model {unit.model_id} is given up", error_line(error),
                  self.store.url_of(*layout.error_name(unit.model_id)))
        log.debug("traceback of %s:\n%s", unit, error)
        self._check_model(unit.model_id, on_model_done)

    def _record_error(self, model_id: str, what: str, error: str) -> None:
        """Keep a failed attempt's traceback in the model's error file (every attempt, oldest first)."""
        tries = self._errors.setdefault(model_id, [])
        tries.append(f"--- {what}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n{error.rstrip()}\n")
        try:
            self.store.write_bytes("\n".join(tries).encode(), *layout.error_name(model_id))
        except OSError as e:  # the log still has it
            log.warning("could not write the traceback of %s: %s", what, e)

    def _whole_saved(self, worker_id: str, report: dict[str, Any], on_model_done: ModelDoneCallback | None) -> None:
        """A worker wrote (or could not write) a whole checkpoint behind: publish it, or ask again.

        After MAX_WHOLE_TRIES failures the model is given up, even one that had finished (the
        search may have learnt from it already; its result is reported failed). That is not in the
        journal: a resumed run tries the write again."""
        model_id, step = report["model_id"], report["step"]
        if self._attempts.get(worker_id) == report["attempt"]:
            # written behind the unit the worker last reported, whose result lockstep still holds:
            # published once the unit is accepted (_unit_done)
            self._saved_early[report["attempt"]] = (worker_id, report)
            return
        entry = self._behind.get((model_id, step))
        if entry is None or entry.attempt != report["attempt"]:
            return  # no longer wanted, or asked again of another worker: the collection takes its file
        if report["error"] is None:
            try:
                self.store.move(checkpoint_name(model_id, step, entry.attempt), checkpoint_name(model_id, step))
            except OSError as e:
                report = {**report, "error": f"the worker reported it written, but: {type(e).__name__}: {e}"}
            else:
                del self._behind[(model_id, step)]
                self._behind_written[0] += 1
                self._behind_written[1] += report["seconds"]
                self._slowest_write_s = max(self._slowest_write_s or 0.0, report["seconds"])
                self._collect_checkpoints(model_id)
                return
        entry.tries += 1
        entry.worker_id = entry.attempt = None  # asked again: of whichever worker is least busy
        url = self.store.url_of(*checkpoint_name(model_id, step))
        self._record_error(model_id, f"writing {url} on worker {worker_id}", report["error"])
        if entry.tries < MAX_WHOLE_TRIES:
            log.warning("could not write %s on worker %s (%s); it will be written again from the model's state",
                        url, worker_id, error_line(report["error"]))
            return
        del self._behind[(model_id, step)]
        log.error("could not write %s %d times (%s): model %s is given up; full traceback in %s", url,
                  MAX_WHOLE_TRIES, error_line(report["error"]), model_id, self.store.url_of(*layout.error_name(model_id)))
        self.scheduler.fail_model(model_id)
        self._check_model(model_id, on_model_done)

    def _ask_behind(self) -> None:
        """Ask a live worker for each whole checkpoint whose writer was lost (or failed); once all W
        are in, so that the first to join is not given them all."""
        if len(self._conns) < self.num_workers:
            return
        load = dict.fromkeys(sorted(self._conns), 0)  # whole checkpoints each worker has been asked for
        for e in self._behind.values():
            if e.worker_id in load:
                load[e.worker_id] += 1
        for (model_id, step), entry in sorted(self._behind.items()):
            if entry.worker_id is not None:
                continue
            worker_id = min(load, key=load.__getitem__)
            load[worker_id] += 1
            entry.worker_id, entry.attempt, entry.since = worker_id, uuid.uuid4().hex[:12], time.time()
            msg = Message.whole(model_id, step, self.specs[model_id], entry.attempt)
            if not _send_quietly(self._conns[worker_id], msg):
                self._lose_worker(worker_id)
                return  # its entries are unasked again; the next pass asks the others

    def _fail_hung_writes(self, job: WorkerJob) -> None:
        """A worker that runs no unit and has said nothing for far longer than a unit or a write has
        taken, while a whole checkpoint of it is outstanding, hangs in a write: its stage starts
        afresh. Before any write is seen (a resumed run's first), the limit is the start timeout."""
        if self.unit_timeout_s is not None:
            limit = self.unit_timeout_s
        else:
            floor = UNIT_TIMEOUT_MIN_S if self._slowest_write_s is not None else self.start_timeout_s
            limit = max(floor, UNIT_TIMEOUT_FACTOR * max(self._slowest_s, self._slowest_write_s or 0.0))
        now = time.time()
        for (model_id, step), entry in list(self._behind.items()):
            w = entry.worker_id
            if w is None or w not in self._conns or w in self._running:
                continue
            if now - max(entry.since, self._heard.get(w, 0.0)) > limit:
                log.error("worker %s has written no whole checkpoint for %.0f s while that of %s at step %d waits "
                          "(it may be stuck on one before it); its worker stage is cancelled so that it starts "
                          "afresh", w, limit, model_id, step)
                self._lose_worker(w)
                job.cancel()

    def _unit_done(self, worker_id: str, unit: Unit, result: dict[str, Any], duration: float,
                   on_model_done: ModelDoneCallback | None) -> None:
        result = {**result, "worker_id": worker_id, "partition": unit.partition}
        attempt = self._attempts.pop(worker_id, None)
        if result.get("attempt") != attempt:
            raise MopError(f"worker {worker_id} reported attempt {result.get('attempt')!r} of {unit}, "
                           f"but was sent attempt {attempt!r} (run {self.store.url})")
        if unit.kind == "train":
            # the accepted attempt becomes the model's checkpoint; any other attempt never does. A
            # train unit writes its state, and at an epoch's end the whole model too (mop/checkpoint.py),
            # with it or behind it
            step = unit.step + 1
            self.store.move(state_name(unit.model_id, step, attempt), state_name(unit.model_id, step))
            if result.get("whole") == "behind":
                self._behind[(unit.model_id, step)] = _Behind(worker_id, attempt, time.time())
            elif self.store.exists(*checkpoint_name(unit.model_id, step, attempt)):
                self.store.move(checkpoint_name(unit.model_id, step, attempt), checkpoint_name(unit.model_id, step))
        self.journal.record(unit, result)  # journal first: a unit is done once it is on record
        record = {"unit": asdict(unit), **result}
        self._records.append(record)
        self._by_model.setdefault(unit.model_id, []).append(record)
        self._units_run += 1
        self._s_per_cost = max(self._s_per_cost, (result["end"] - result["start"]) / self._unit_cost(unit))
        self._slowest_s = max(self._slowest_s, result["end"] - result["start"])
        self.scheduler.unit_finished(worker_id, unit, duration=duration)
        self._log_progress(unit, result)
        status = self.scheduler.model_status(unit.model_id)
        if (self._on_epoch is not None and status.state == "running" and self._epoch_closed(status, unit.epoch)
                and (unit.kind == "val") == self.scheduler.validate):
            history = self._history(unit.model_id)
            self._epoch_done(unit.model_id, unit.epoch, history)
        self._check_model(unit.model_id, on_model_done)
        while self._stopped_now:  # other models a decision stopped: their workers are free now
            self._check_model(self._stopped_now.pop(0), on_model_done)
        early = self._saved_early.pop(attempt, None)
        if early is not None:  # its whole model was written while lockstep held the result
            self._whole_saved(*early, on_model_done)
        self._collect_checkpoints(unit.model_id)

    def _epoch_closed(self, status: Any, epoch: int) -> bool:
        """Whether ``epoch`` of the model has all its results in (its validation, or its training)."""
        if self.scheduler.validate:
            return epoch in status.validated_epochs
        return status.epochs_trained > epoch

    def _epoch_done(self, model_id: str, epoch: int, history: dict[str, list[float]]) -> None:
        assert self._on_epoch is not None
        if self._on_epoch(model_id, epoch, history):
            self.stop(model_id)

    def _collect_checkpoints(self, model_id: str) -> None:
        """Delete the checkpoints of ``model_id`` that nothing can read any more.

        A step has a hop state (``.state``, what units read) and, at an epoch's end, the whole
        model (``.keras``, what results and the export read). Kept states: the newest while the
        model still trains (the next train unit reads it; a lost unit re-runs from it), each
        epoch's last while that epoch's validation is not complete (val units read it), and that of
        a kept whole model still being written behind (what it is written again from). Kept whole
        models: the newest, the final one and, with ``select``, the best epoch's and those of epochs
        not yet validated (each may turn out the best). Attempt files of
        dispatches the driver gave up on are deleted too (a stale worker may still write one
        later; the next pass takes it). Safe at any time: a train unit only ever reads its model's
        newest state, a val unit only its epoch's last, so nothing in flight reads what goes.
        """
        keep = self._wanted(model_id)
        if keep is not None:
            for key in [k for k in self._behind if k[0] == model_id]:
                if key[1] in keep["keras"]:
                    keep["state"].add(key[1])  # what it is written from, should its writer be lost
                else:  # nothing will read it: not to be written, or dropped when it comes
                    entry = self._behind.pop(key)
                    self._behind_dropped += 1
                    if entry.worker_id in self._conns and entry.attempt is not None:
                        _send_quietly(self._conns[entry.worker_id], Message.drop(model_id, key[1], entry.attempt))
        in_flight = set(self._attempts.values()) | {e.attempt for e in self._behind.values()}
        for name in self.store.listdir(layout.MODELS_DIR, model_id):
            partial = layout.partial_of(name)
            parsed = layout.parse_checkpoint(name if partial is None else partial)
            if parsed is None:
                continue
            step, attempt = parsed
            kind = name.rsplit(".", 1)[-1]
            if attempt is not None:  # (a partial one too: a writer that died mid-write leaves it)
                drop = attempt not in in_flight
            else:  # a partial write of a plain name is someone's in progress
                drop = partial is None and keep is not None and step not in keep[kind]
            if drop:
                try:
                    self.store.delete(layout.MODELS_DIR, model_id, name)
                except OSError as e:  # kept for the next pass: space is not worth failing a run
                    log.warning("could not delete %s of %s: %s", name, model_id, e)

    def _wanted(self, model_id: str) -> dict[str, set[int]] | None:
        """The steps of ``model_id`` whose checkpoints are kept, by kind ("state", "keras"); None:
        all of them (``keep_checkpoints="all"``). See :meth:`_collect_checkpoints`."""
        if self.keep_checkpoints == "all":
            return None
        status = self.scheduler.model_status(model_id)
        P = self.num_workers
        validated = set(status.validated_epochs)
        pending = {(e + 1) * P for e in range(status.epochs_trained) if self.scheduler.validate and e not in validated}
        live = status.state not in ("done", "stopped", "failed")
        keep = {"state": pending | ({status.step} if live else set()), "keras": {status.step, status.num_epochs * P}}
        if self.select is not None:
            # an epoch not yet validated may still turn out the best
            keep["keras"] |= pending
            best = self._best_epoch(model_id)
            if best is not None:
                keep["keras"].add((best + 1) * P)
        return keep

    def _history(self, model_id: str) -> dict[str, list[float]]:
        """The model's per-epoch history from its own records (not the whole run's)."""
        return histories(self._by_model.get(model_id, []), self.num_workers).get(model_id, {})

    def _best_epoch(self, model_id: str) -> int | None:
        if self.select is None:
            return None
        keys, mode = self.select
        history = self._history(model_id)
        # one name, or aliases of one metric (acc / accuracy): the first the history records
        series = next((history[k] for k in ([keys] if isinstance(keys, str) else keys) if k in history), [])
        scored = [(v if mode == "min" else -v, e) for e, v in enumerate(series) if v == v]  # skip NaN
        return min(scored)[1] if scored else None

    def _check_model(self, model_id: str, on_model_done: ModelDoneCallback | None) -> None:
        if model_id in self._completed_models:
            return
        if self.scheduler.model_status(model_id).state in ("done", "stopped", "failed"):
            history = self._history(model_id)
            self._model_complete(model_id, history, on_model_done)

    def _model_complete(self, model_id: str, history: dict[str, list[float]],
                        on_model_done: ModelDoneCallback | None) -> None:
        if model_id in self._completed_models:
            return
        self._completed_models.add(model_id)
        if on_model_done is not None:
            for spec in on_model_done(model_id, history) or []:
                self.add(spec)

    def _lose_worker(self, worker_id: str) -> None:
        conn = self._conns.pop(worker_id, None)
        if conn is not None:
            conn.close()
        for entry in self._behind.values():
            if entry.worker_id == worker_id:  # asked again of a live worker (_ask_behind)
                entry.worker_id = entry.attempt = None
        for attempt in [a for a, (w, _) in self._saved_early.items() if w == worker_id]:
            del self._saved_early[attempt]  # its unit is not accepted now: the file is a stale attempt's
        if worker_id not in self.scheduler.workers:
            return  # already lost (twice in one batch of events): nothing left to put back
        self._running.pop(worker_id, None)
        self._attempts.pop(worker_id, None)
        self._forget_in_lockstep(worker_id)
        lost = self.scheduler.worker_left(worker_id)
        log.warning("worker %s left%s", worker_id, f"; unit {lost} will run again" if lost else "")

    def _log_progress(self, unit: Unit, result: dict[str, Any]) -> None:
        p = self.scheduler.counts()  # O(1): progress() adds an O(M) dict per model
        elapsed = max(time.time() - self._t0, 1e-9)
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(result["metrics"].items()))
        log.info("[%s] %s epoch %d %s p%d in %.1fs (%s) | models %d/%d, units %d/%d, %.1f units/min",
                 time.strftime("%H:%M:%S"), unit.model_id, unit.epoch + 1, unit.kind, unit.partition,
                 result["end"] - result["start"], metrics, p["models_done"], p["models_total"],
                 p["units_done"], p["units_total"], 60.0 * self._units_run / elapsed)

    def _result(self) -> MopResult:
        hist = histories(self._records, self.num_workers)
        figures = timeline_figures(self._records, self.num_workers)
        # off every unit's path: written while their workers waited for the next unit
        figures["wholes_written_behind"] = self._behind_written[0]
        figures["whole_behind_s"] = round(self._behind_written[1], 3)
        figures["wholes_dropped"] = self._behind_dropped  # no longer wanted before they were written
        self.store.write_json(hist, layout.HISTORY)
        # the metric states are the journal's business (exact merges); the timeline stays small
        timeline = [{k: v for k, v in r.items() if k != "metric_state"} for r in self._records]
        self.store.write_json({"records": timeline, "figures": figures}, layout.TIMELINE)
        failed = [m for m in self.specs if self.scheduler.model_status(m).state == "failed"]
        failures = {m: self._failure(m) for m in failed}
        return MopResult(run_url=self.store.url, specs=dict(self.specs), histories=hist, records=list(self._records),
                         workers=list(self._worker_info.values()), figures=figures, wall_s=time.time() - self._t0,
                         units_run=self._units_run, failed_models=failed, failures=failures)

    def _failure(self, model_id: str) -> dict[str, str]:
        """What a failed model's summary row says: the last error's first line and where all of it is."""
        parts = layout.error_name(model_id)
        tries = self._errors.get(model_id)
        if tries is None and self.store.exists(*parts):  # failed before a resume: the file has it
            tries = [self.store.read_bytes(*parts).decode(errors="replace")]
        return {"error": error_line(tries[-1]) if tries else "failed in an earlier attempt of this run",
                "traceback": self.store.url_of(*parts)}


class _BarrierJob:
    """The Spark job holding the W worker tasks, run in a thread so the driver loop stays free."""

    def __init__(self, spark: Any, num_workers: int, server: ControlServer, workload: Workload, run_url: str,
                 settings: WorkerSettings) -> None:
        self.error: str | None = None
        self._done = threading.Event()
        self._sc = sc = spark.sparkContext
        self.group = f"mop-{uuid.uuid4().hex[:12]}"
        fn = barrier_task(server.address, server.secret, workload, run_url, settings)

        def target() -> None:
            try:
                # interruptOnCancel: cancelling kills the tasks' Python workers, even a hung one
                sc.setJobGroup(self.group, f"MOP workers ({num_workers})", interruptOnCancel=True)
                sc.parallelize(range(num_workers), num_workers).barrier().mapPartitions(fn).collect()
            except Exception as e:  # reported to the driver loop, which decides to resubmit or fail
                self.error = _root_cause(e)
                log.warning("MOP worker stage failed: %s", self.error)
            finally:
                self._done.set()

        self._thread = threading.Thread(target=target, name="mop-barrier-job", daemon=True)
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def stopping(self) -> None:
        """The driver is stopping the workers; Spark reports how its tasks end."""

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def cancel(self) -> None:
        self._sc.cancelJobGroup(self.group)


WorkerJob = Any  # _BarrierJob, or mop/local_workers.LocalWorkerJob: finished, error, stopping(), join(), cancel(), group


def _root_cause(e: BaseException) -> str:
    """The line of a (Py4J-wrapped) Spark error that says why, not where it was called from."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        found = re.search(r"([\w.$]+(?:Exception|Error): .*)", line)
        if found and "Py4JJavaError" not in found.group(1):
            return found.group(1)[:500]
    return f"{type(e).__name__}: {lines[0][:500] if lines else ''}"


def error_line(text: str) -> str:
    """The first line of the exception a traceback ends with (``ValueError: bad shape``)."""
    lines = text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    # the last exception block: after its frames (indented), the first unindented line
    for line in lines[(starts[-1] + 1) if starts else 0:]:
        if line.strip() and not line.startswith((" ", "\t", "---")):
            return line.strip()[:500]
    return (lines[-1].strip() if lines else "unknown error")[:500]


def _send_quietly(conn: Connection, msg: Message) -> bool:
    try:
        conn.send(msg)
        return True
    except (OSError, ValueError):
        return False


def run_mop(spark: Any, workload: Workload, specs: list[ModelSpec], run_url: str, *, num_workers: int, seed: int = 0,
            resume: bool = True, on_model_done: ModelDoneCallback | None = None, **kwargs: Any) -> MopResult:
    """Train `specs` with MOP; with `resume`, continue a run found at `run_url`."""
    driver = MopDriver(spark, workload, run_url, num_workers=num_workers, seed=seed, **kwargs)
    if resume:
        driver.resume()
    for spec in specs:
        if spec.model_id not in driver.specs:
            driver.add(spec)
    return driver.run(on_model_done)
