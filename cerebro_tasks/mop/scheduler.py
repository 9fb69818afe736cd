"""The pure, event-driven hop scheduler of Model Hopper Parallelism (MOP).

The Spark runtime owns the workers and the clock; this module owns only the decision of which
unit runs where. The runtime reports events (``worker_joined``, ``worker_left``,
``unit_finished``, ``unit_failed``, ``add_model``, ``stop_model``) and then calls ``assign()``,
which returns the units to dispatch to idle workers. Standard library only, no I/O, no clock,
not thread-safe (the driver serialises calls): the same seed and the same event sequence give
the same assignments, and ``state_dict()`` / ``from_state_dict()`` round-trip everything,
including the RNG.

Units (docs/design.md, "The MOP contract"):

* ``train`` unit: model ``m`` trains one sub-epoch on partition ``p``. It reads ``ckpt-<step>``
  and writes ``ckpt-<step+1>``, where ``step`` is the number of train units of ``m`` finished
  before it. Within an epoch a model visits every partition exactly once, in any order, and a
  model never runs two train units at once (its SGD stays sequential). A train unit's step is
  fixed when it is dispatched: a unit lost with its worker may come back with a later step if
  the model meanwhile trained on other partitions.
* ``val`` unit: model ``m`` is evaluated on validation partition ``p`` with the immutable
  checkpoint ``ckpt-<(e+1)*P>`` of epoch ``e``. The ``P`` val units of epoch ``e`` become runnable
  once epoch ``e``'s ``P`` train units are done; they may run on several workers at once and
  beside the training of epoch ``e+1``.
* Partition ``p`` (train and val) lives on exactly one worker; its units run only there and wait
  while no worker owns ``p``.

Each model advances on its own: no barrier between epochs or between training and validation.
Every policy is work-conserving: after ``assign()`` no idle worker has a runnable unit.

Policies (``policy=``):

* ``"critical"`` (default): list scheduling by remaining work. A model's *chain* is its
  remaining train units times its observed mean unit time, plus one val unit: its own observed
  val mean, or ``VAL_COST_PRIOR`` x its train mean until its own val unit is timed. A model
  not yet timed is estimated from the run's mean unit time (1 before anything is timed: its
  remaining unit count, plus the prior). So a chain changes only on the model's own events and
  can be kept in an index (cost, below). A model is *critical* when its chain is at least
  ``CRITICAL_MARGIN`` x the run's remaining work per live worker (there a val unit not yet
  timed costs the run's observed val/train ratio), i.e. when the chain rather than the total
  work bounds the makespan; while no more models are training than there are workers, all of
  them are. Each ``assign()`` places, in order:

  1. train units of critical models, longest chain first: delaying them delays the run;
  2. val units, oldest epoch first: they are short, never lengthen a chain, and early stopping
     and TPE wait for their metrics;
  3. the other train units, longest chain first (they have slack).

  With ``val_priority="filler"`` it is 3 (all models) then 2: val runs only where no train
  unit can, which is within noise of the default on makespan but leaves models' final metrics
  about a fifth of the run late (bench/scheduler_sim.py). Starting the longest chains first is
  what keeps the makespan near max(total work / W, longest chain); uniform random choice starts
  expensive models late and their chains stick out past the rest. A model with several free
  partitions takes the one the fewest other waiting models still need (ties: the seeded RNG).
  Equal chains and equal val epochs go by a per-model tie key drawn from the seeded RNG when
  the model is added.
* ``"random"``: the original Cerebro rule: an idle worker takes a uniformly random runnable unit
  (train or val) of its partition.

Cost (``"critical"``): the driver calls ``unit_finished`` and ``assign()`` on every event, so
neither walks the models. Each event of a model updates its entries in mop/sched_index.py: the
waiting models (free to start a train unit) in chain order, how many of them still need each
partition, the pending val units of each partition by epoch, and exact sums of the run's
remaining work. ``assign()`` then walks waiting models from the longest chain down, skipping
those that need none of the idle partitions, and stops as soon as no waiting model needs one:
O(log M) per placed unit in the steady state (bench/scheduler_sim.py --scale: under 0.1 ms of
driver CPU per unit at W = 512, M = 4,096). A partition that only models deep in the chain
order still need costs a longer walk (a few hundred pops at the very end of a run). The chain
definition above (prior val term, run means applied when read) is what keeps the index valid
between a model's own events. bench/scheduler_sim.py compared makespan / lower bound,
utilisation, loads saved and result lag with the former scheduler (a full sort per call, the
run's val/train ratio in every chain, RNG draws per candidate): within seed noise (21 seeds x
16 configurations: per-seed makespan ratio new/old mean 1.0005, median 1.0000; rows move by
up to +-0.6 %, as much as redrawing tie keys alone moves them). ``"random"`` still looks at
every model per idle worker (it is the baseline; its schedules are unchanged). ``counts()``
and ``explain_idle()`` read counters kept on the way (O(1)); ``progress()`` adds an O(M)
per-model dict.

Affinity (``affinity=True``): a worker keeps the weights of the last unit it ran in memory: the
weights after a train unit (``ckpt-<step+1>``) or the checkpoint a val unit read. A unit that
reads exactly that checkpoint of that model needs no load; this happens when a model continues
on the same worker at an epoch boundary, or is validated on the worker that just finished its
epoch. When a model has several free partitions, it takes the one holding it; among the val
units of a free worker, the one it holds goes first. Affinity only changes *where* and never
*whether* a model runs, so it costs no priority. ``affinity_hits`` counts dispatches that can
skip the load; the runtime applies the same rule (same model and same step as its last unit).

Gates (``add_model(gates=...)``): at the epochs an early-stopping rule decides, a model's next
epoch starts only once the previous one is validated, so a stop costs no further training;
meanwhile its partitions serve other models' units (work-conserving among what may run).

Failures: ``worker_left`` puts the running unit back without charging a retry (losing a worker
is not the unit's fault). ``unit_failed`` charges one retry to that unit; after
``max_unit_retries`` retries the *model* is marked ``"failed"`` (its pending units are dropped
and it counts as done) instead of raising, so one diverging or out-of-memory configuration does
not abort the whole model selection.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from cerebro_tasks.mop.sched_index import ExactSum, TrainIndex, ValIndex

__all__ = ["HopScheduler", "ModelStatus", "SchedulerError", "Unit", "POLICIES", "VAL_PRIORITIES"]

POLICIES = ("critical", "random")
VAL_PRIORITIES = ("auto", "filler")

# Model states. "pending": added, nothing dispatched yet; "running": some unit dispatched;
# terminal ones: "done", "stopped", "failed".
_TERMINAL = ("done", "stopped", "failed")
_STATES = ("pending", "running") + _TERMINAL

# 2: per-model tie keys (drawn from the RNG at add_model) replace per-call RNG draws.
_STATE_VERSION = 2

# Val/train unit cost assumed until the model's own val unit has been timed: validation is
# forward-only (about 1/3 of a forward+backward pass over the same rows). Only the size of the
# "+ one val unit" term of a model's chain depends on it (the run's remaining work uses the
# run's observed val/train ratio once it has one).
VAL_COST_PRIOR = 1 / 3
# A model counts as critical when its chain is at least this share of the run's remaining work
# per worker: estimates are noisy, and a nearly critical model that yields to val units becomes
# the critical one (bench/scheduler_sim.py: 0.8 and 1.0 are within noise, 0.8 slightly ahead).
CRITICAL_MARGIN = 0.8


class SchedulerError(ValueError):
    """An event that contradicts the scheduler's state (a runtime bug or a stale report)."""


@dataclass(frozen=True)
class Unit:
    """One unit of MOP work; see the module docstring for ``step``."""

    model_id: str
    epoch: int  # 0-based
    kind: str  # "train" or "val"
    partition: int  # 0..P-1; partition p is owned by exactly one worker
    step: int  # checkpoint read: train reads ckpt-<step> (writes step+1); val of e reads (e+1)*P

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(d["model_id"], int(d["epoch"]), d["kind"], int(d["partition"]), int(d["step"]))


@dataclass(frozen=True)
class ModelStatus:
    """A read-only view of one model, for logs, UIs and early-stopping logic."""

    model_id: str
    state: str  # "pending" | "running" | "done" | "stopped" | "failed"
    num_epochs: int
    epochs_trained: int  # epochs whose P train units are all finished
    step: int  # train units finished (= the newest checkpoint written)
    validated_epochs: tuple[int, ...]  # epochs whose P val units are all finished
    running: tuple[tuple[str, Unit], ...]  # (worker_id, unit) in flight
    retries: int  # unit_failed events charged to this model
    mean_train_s: float | None  # observed mean train unit duration
    mean_val_s: float | None


@dataclass
class _Model:
    """Mutable per-model bookkeeping (internal)."""

    model_id: str
    num_epochs: int
    order: int  # insertion order: a stable, deterministic tie-break before the RNG
    state: str = "pending"
    epoch: int = 0  # current training epoch; == num_epochs when training is complete
    visited: set[int] = field(default_factory=set)  # partitions trained in the current epoch
    train_worker: str | None = None
    val_todo: dict[int, set[int]] = field(default_factory=dict)  # epoch -> partitions not started
    val_running: dict[tuple[int, int], str] = field(default_factory=dict)  # (epoch, p) -> worker
    val_finished: dict[int, int] = field(default_factory=dict)  # epoch -> val units finished
    retries: dict[str, int] = field(default_factory=dict)  # "kind:epoch:partition" -> count
    train_sum: float = 0.0
    train_n: int = 0
    val_sum: float = 0.0
    val_n: int = 0
    # epochs whose training waits until the previous epoch is validated (early stopping decides there)
    gates: frozenset[int] = frozenset()
    tie: float = 0.0  # seeded random tie key, drawn once at add_model: equal chains go by it
    # Derived, never serialised (HopScheduler._rebuild): whether the model is in the TrainIndex's
    # need counts, and what it last contributed to the run-wide sums and counters (_touch).
    counted: bool = field(default=False, repr=False, compare=False)
    contrib: tuple = field(default=(), repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        return self.state in _TERMINAL

    def step(self, num_partitions: int) -> int:
        return self.epoch * num_partitions + len(self.visited)

    def n_running(self) -> int:
        return (self.train_worker is not None) + len(self.val_running)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "num_epochs": self.num_epochs,
            "order": self.order,
            "state": self.state,
            "epoch": self.epoch,
            "visited": sorted(self.visited),
            "train_worker": self.train_worker,
            "val_todo": [[e, sorted(ps)] for e, ps in self.val_todo.items()],
            "val_running": [[e, p, w] for (e, p), w in self.val_running.items()],
            "val_finished": [[e, n] for e, n in self.val_finished.items()],
            "retries": dict(self.retries),
            "train_sum": self.train_sum,
            "train_n": self.train_n,
            "val_sum": self.val_sum,
            "val_n": self.val_n,
            "gates": sorted(self.gates),
            "tie": self.tie,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Model:
        return cls(
            model_id=d["model_id"],
            num_epochs=int(d["num_epochs"]),
            order=int(d["order"]),
            state=d["state"],
            epoch=int(d["epoch"]),
            visited=set(d["visited"]),
            train_worker=d["train_worker"],
            val_todo={int(e): set(ps) for e, ps in d["val_todo"]},
            val_running={(int(e), int(p)): w for e, p, w in d["val_running"]},
            val_finished={int(e): int(n) for e, n in d["val_finished"]},
            retries={k: int(v) for k, v in d["retries"].items()},
            train_sum=float(d["train_sum"]),
            train_n=int(d["train_n"]),
            val_sum=float(d["val_sum"]),
            val_n=int(d["val_n"]),
            gates=frozenset(int(e) for e in d.get("gates", ())),
            tie=float(d["tie"]),
        )


def _retry_key(unit: Unit) -> str:
    return f"{unit.kind}:{unit.epoch}:{unit.partition}"


class HopScheduler:
    """Decides which (model, partition) unit each idle worker runs next; see the module docstring.

    Typical driver loop::

        s = HopScheduler(P, seed=run_seed)
        for m in models: s.add_model(m.id, num_epochs)
        for w in workers: s.worker_joined(w.id, w.partition)
        while not s.done:
            for worker_id, unit in s.assign(): dispatch(worker_id, unit)
            if (msg := s.explain_idle()): log(msg)
            event = wait_for_event()   # -> s.unit_finished(...), s.worker_left(...), ...

    Args:
        num_partitions: P; partition p is owned by one worker at a time (``worker_joined``).
        seed: seeds the RNG that breaks ties (and drives ``policy="random"``).
        validate: schedule P val units per model-epoch; False: training only.
        policy: ``"critical"`` or ``"random"`` (the original Cerebro choice).
        affinity: prefer placements that reuse the weights a worker holds in memory.
        val_priority: ``"auto"`` (val units before train units that have slack) or
            ``"filler"`` (val units only where no train unit can run).
        max_unit_retries: ``unit_failed`` re-runs of one unit before its model is failed.
    """

    def __init__(
        self,
        num_partitions: int,
        *,
        seed: int = 0,
        validate: bool = True,
        policy: str = "critical",
        affinity: bool = True,
        val_priority: str = "auto",
        max_unit_retries: int = 2,
    ) -> None:
        if num_partitions < 1:
            raise SchedulerError(f"num_partitions must be >= 1, got {num_partitions}")
        if policy not in POLICIES:
            raise SchedulerError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        if max_unit_retries < 0:
            raise SchedulerError("max_unit_retries must be >= 0")
        self.num_partitions = int(num_partitions)
        self.seed = int(seed)
        self.validate = bool(validate)
        self.policy = policy
        self.affinity = bool(affinity)
        if val_priority not in VAL_PRIORITIES:
            raise SchedulerError(f"unknown val_priority {val_priority!r}; choose one of "
                                 f"{VAL_PRIORITIES}")
        self.val_priority = val_priority
        self.max_unit_retries = int(max_unit_retries)
        self._rng = random.Random(self.seed)
        self._models: dict[str, _Model] = {}
        self._live: dict[str, _Model] = {}  # models not yet done/stopped/failed, in add order
        self._workers: dict[str, int] = {}  # live worker -> partition
        self._owner: dict[int, str] = {}  # partition -> live worker
        self._running: dict[str, Unit] = {}  # worker -> unit in flight
        # worker -> (model, step) of the weights it holds in memory (see Affinity)
        self._held: dict[str, tuple[str, int]] = {}
        # Run-wide duration sums: the estimate for models not yet observed.
        self._train_sum = 0.0
        self._train_n = 0
        self._val_sum = 0.0
        self._val_n = 0
        self.affinity_hits = 0  # dispatches that can reuse in-memory weights (ckpt loads saved)
        self._init_derived()

    def _init_derived(self) -> None:
        """Empty indexes and counters; everything here follows from the state (``_rebuild``)."""
        P = self.num_partitions
        self._free = TrainIndex(P)  # waiting models in chain order + per-partition need counts
        self._vals = ValIndex(P, self._val_pending)  # pending val units per partition
        self._idle: set[int] = set()  # partitions whose live owner runs nothing
        # The run's remaining work, split so run-wide means are applied when read (_per_worker):
        # sum of rem x own mean (timed models), rem of untimed ones, val_left x own val mean,
        # val_left x own train mean (val untimed), val_left (both untimed).
        self._rem_timed = ExactSum()
        self._rem_untimed = 0
        self._val_timed = ExactSum()
        self._val_by_train = ExactSum()
        self._val_untimed = 0
        self._n_training = 0  # live models with train units left
        self._units_done = 0
        self._units_total = 0
        self._by_state = dict.fromkeys(_STATES, 0)

    def _rebuild(self) -> None:
        """Recompute every derived index and counter from the models (after from_state_dict)."""
        self._init_derived()
        for m in self._models.values():
            m.counted, m.contrib = False, ()
            for e, ps in m.val_todo.items():
                for p in ps:
                    self._vals.add(p, e, m.tie, m.order, m.model_id)
            self._touch(m)
        self._idle = {p for w, p in self._workers.items() if w not in self._running}

    # ------------------------------------------------------------------ models
    def add_model(self, model_id: str, num_epochs: int, gates: tuple[int, ...] = ()) -> None:
        """Add a model to train for ``num_epochs`` epochs; allowed at any time, also mid-run.

        ``gates``: epochs (0-based) whose training starts only once the previous epoch is
        validated, so that early stopping can decide there before more is spent on the model;
        its workers take other models' units meanwhile (ignored without validation).
        """
        if model_id in self._models:
            raise SchedulerError(f"model {model_id!r} was already added")
        if int(num_epochs) < 1:
            raise SchedulerError(f"num_epochs must be >= 1, got {num_epochs}")
        # One draw per model, not one per model per assign(): ties then cost nothing to break.
        # "random" never reads it; not drawing keeps that policy's RNG stream as it always was.
        tie = self._rng.random() if self.policy != "random" else 0.0
        m = _Model(model_id, int(num_epochs), order=len(self._models), gates=frozenset(int(e) for e in gates),
                   tie=tie)
        self._models[model_id] = m
        self._live[model_id] = m
        self._touch(m)

    def stop_model(self, model_id: str) -> None:
        """Early-stop a model: its pending units are dropped and it counts as done at once.

        Units already running may finish (``unit_finished`` is accepted and recorded) but nothing
        new is dispatched. Stopping a model that is already terminal is a no-op.
        """
        m = self._model(model_id)
        if m.terminal:
            return
        self._end(m, "stopped")
        self._touch(m)

    def fail_model(self, model_id: str) -> None:
        """Give a model up for a fault outside its units (its whole checkpoint cannot be written):
        as ``stop_model``, but it counts as failed, also when it had finished training."""
        m = self._model(model_id)
        if m.state == "failed":
            return
        self._end(m, "failed")
        self._touch(m)

    # ----------------------------------------------------------------- workers
    def worker_joined(self, worker_id: str, partition: int) -> None:
        """The worker owning ``partition`` is (again) available.

        A worker id that re-joins while it still has a unit in flight is treated as restarted:
        that unit goes back to pending first (as by ``worker_left``).
        """
        if not 0 <= partition < self.num_partitions:
            raise SchedulerError(f"partition {partition} out of range 0..{self.num_partitions - 1}")
        if worker_id in self._workers:
            if self._workers[worker_id] != partition:
                raise SchedulerError(
                    f"worker {worker_id!r} owns partition {self._workers[worker_id]}, "
                    f"cannot re-join as owner of {partition}")
            self.worker_left(worker_id)
        owner = self._owner.get(partition)
        if owner is not None:
            raise SchedulerError(
                f"partition {partition} is already owned by live worker {owner!r}; "
                f"report worker_left({owner!r}) before {worker_id!r} takes it over")
        self._workers[worker_id] = partition
        self._owner[partition] = worker_id
        self._idle.add(partition)

    def worker_left(self, worker_id: str) -> Unit | None:
        """The worker is gone. Returns its running unit, which goes back to pending.

        Returns None when it ran nothing, or when the unit's model is stopped or failed (then the
        unit is simply dropped). No retry is charged. Its partition's units wait for a new owner.
        """
        if worker_id not in self._workers:
            raise SchedulerError(f"unknown worker {worker_id!r}")
        partition = self._workers.pop(worker_id)
        del self._owner[partition]
        self._idle.discard(partition)
        self._held.pop(worker_id, None)
        unit = self._running.pop(worker_id, None)
        if unit is None:
            return None
        m = self._models[unit.model_id]
        self._release(m, unit)
        if not m.terminal:
            self._requeue(m, unit)
        self._touch(m)
        return None if m.terminal else unit  # stopped/failed: nothing to re-run

    # -------------------------------------------------------------- unit events
    def unit_finished(self, worker_id: str, unit: Unit, duration: float | None = None) -> None:
        """``worker_id`` finished ``unit``; ``duration`` (seconds, optional) feeds the policy."""
        self._take_running(worker_id, unit)
        m = self._models[unit.model_id]
        self._release(m, unit)
        # a non-finite duration (a broken clock) would poison every mean: ignore it
        if duration is not None and duration >= 0 and math.isfinite(duration):
            self._observe(m, unit.kind, float(duration))
        self._complete(m, unit)
        self._touch(m)
        self._held[worker_id] = (m.model_id, unit.step + (unit.kind == "train"))

    def unit_failed(self, worker_id: str, unit: Unit) -> bool:
        """``unit`` failed on ``worker_id``; it goes back to pending and one retry is charged.

        Returns True if it will be re-run. Once a unit has failed more than
        ``max_unit_retries`` times its model is marked ``"failed"`` (pending units dropped, it
        counts as done) and False is returned; other models are unaffected.
        """
        self._take_running(worker_id, unit)
        m = self._models[unit.model_id]
        self._release(m, unit)
        # The worker's in-memory copy may be what broke; do not reuse it.
        self._held.pop(worker_id, None)
        key = _retry_key(unit)
        m.retries[key] = m.retries.get(key, 0) + 1
        again = False
        if m.terminal:
            pass
        elif m.retries[key] > self.max_unit_retries:
            self._end(m, "failed")
        else:
            self._requeue(m, unit)
            again = True
        self._touch(m)
        return again

    def restore_finished(self, unit: Unit) -> None:
        """Journal replay on resume: mark ``unit`` finished without a worker.

        Units must be replayed in the order they finished (train units of a model in step
        order); anything inconsistent raises SchedulerError rather than silently diverging
        from the checkpoints on disk.
        """
        m = self._model(unit.model_id)
        if unit.kind == "train":
            if m.train_worker is not None:
                raise SchedulerError(f"cannot restore {unit}: a train unit of the model is running")
            self._check_next_train(m, unit)
        elif unit.kind == "val":
            if (unit.epoch, unit.partition) in m.val_running:
                raise SchedulerError(f"cannot restore {unit}: it is running")
            if not self.validate:
                raise SchedulerError(f"cannot restore {unit}: validation is off")
            self._check_val(m, unit)
            if not m.terminal and unit.partition not in m.val_todo.get(unit.epoch, ()):
                raise SchedulerError(f"cannot restore {unit}: not pending (finished twice?)")
        else:
            raise SchedulerError(f"unknown unit kind {unit.kind!r}")
        self._complete(m, unit)
        self._touch(m)

    # ------------------------------------------------------------------ assign
    def assign(self) -> list[tuple[str, Unit]]:
        """Dispatch decisions for all idle workers that have runnable work.

        Work-conserving: after the call no idle worker has a runnable unit on its partition.
        The returned units count as running: the caller must dispatch every one of them.
        """
        if not self._idle:
            return []
        idle = {p: self._owner[p] for p in sorted(self._idle)}
        out: list[tuple[str, Unit]] = []
        if self.policy == "random":
            self._assign_random(idle, out)
        elif self.val_priority == "auto":
            if self._n_training <= len(self._workers):
                critical = -math.inf  # each training model could have a worker to itself
            else:
                critical = CRITICAL_MARGIN * self._per_worker()
            self._assign_train(idle, out, critical)
            self._assign_val(idle, out)
            self._assign_train(idle, out)
        else:
            self._assign_train(idle, out)
            self._assign_val(idle, out)
        return out

    def _run_means(self) -> tuple[float, float]:
        """The run's mean train unit time (1 before any is timed) and val/train time ratio."""
        run_t = self._train_sum / self._train_n if self._train_n else 1.0
        val_ratio = (self._val_sum / self._val_n / run_t
                     if self._val_n and self._train_n and run_t > 0 else VAL_COST_PRIOR)
        return run_t, val_ratio

    def _per_worker(self) -> float:
        """The run's remaining work per live worker: a model is critical when its chain is close.

        Unit times are a model's observed means; for a model not yet timed the run's means (TPE
        adds models mid-run); before anything is timed 1 per train unit. A val unit costs the
        model's own val mean, else its train mean x the run's val/train ratio (VAL_COST_PRIOR
        before any val unit is timed). The per-model terms are kept in exact sums by _touch;
        only the run-wide means are applied here, so this is O(1).
        """
        run_t, val_ratio = self._run_means()
        total = (self._rem_timed.value + run_t * self._rem_untimed + self._val_timed.value
                 + val_ratio * (self._val_by_train.value + run_t * self._val_untimed))
        return total / max(1, len(self._workers))

    def _assign_train(self, idle: dict[int, str], out: list[tuple[str, Unit]],
                      at_least: float = -math.inf) -> None:
        """Longest remaining chain first (chains >= ``at_least``); each model goes to a free
        partition it still needs.

        Walks the waiting models in chain order, skipping those that need none of the idle
        partitions, and stops as soon as no waiting model needs any of them: in the steady state
        (one idle worker, M >> W) that is a few heap pops, not a pass over every model.
        """
        free = self._free
        if not free.any_need(idle):
            return
        run_t, _ = self._run_means()
        extra = VAL_COST_PRIOR if self.validate else 0.0  # the val term of untimed models' chains
        skipped: list[tuple[int, Any]] = []
        free.hold_compaction = True  # popped entries are outside the heaps until pushed back
        try:
            while idle and free.any_need(idle):
                top = free.best(run_t, extra)
                if top is None or top[0] < at_least:
                    break
                _, h, entry = top
                free.pop(h)
                m = self._models[entry[3]]
                options = [p for p in idle if p not in m.visited]
                if not options:
                    skipped.append((h, entry))
                    continue
                p = self._pick_partition(m, options, idle)
                self._dispatch(idle.pop(p), self._train_unit(m, p), out)
        finally:
            for h, entry in skipped:  # still waiting, same chain: back where they were
                free.push_back(h, entry)
            free.hold_compaction = False

    def _pick_partition(self, m: _Model, options: list[int], idle: dict[int, str]) -> int:
        if self.affinity:
            here = (m.model_id, m.step(self.num_partitions))
            for p in options:
                if self._held.get(idle[p]) == here:
                    return p
        if len(options) == 1:
            return options[0]
        # The partition fewest other waiting models still need, so those are not stranded
        # (the count includes m itself on every option, which does not change the choice).
        need = self._free.need
        return min(options, key=lambda p: (need(p), self._rng.random()))

    def _assign_val(self, idle: dict[int, str], out: list[tuple[str, Unit]]) -> None:
        """Each free worker takes a val unit of its partition: the one whose checkpoint it holds
        in memory, else the oldest epoch (fresh metrics for early stopping); ties by the models'
        seeded tie keys."""
        P = self.num_partitions
        vals = self._vals
        for p in list(idle):
            if not vals.count(p):
                continue
            m: _Model | None = None
            e = -1
            held = self._held.get(idle[p]) if self.affinity else None
            if held is not None and held[1] % P == 0:
                hm = self._live.get(held[0])
                he = held[1] // P - 1  # the epoch whose checkpoint the worker holds
                if hm is not None and p in hm.val_todo.get(he, ()):
                    m, e = hm, he
            if m is None:
                head = vals.head(p)
                assert head is not None, "val count and heap out of step"
                e, m = head[0], self._models[head[3]]
            self._dispatch(idle.pop(p), self._val_unit(m, e, p), out)

    def _assign_random(self, idle: dict[int, str], out: list[tuple[str, Unit]]) -> None:
        """The original rule: each idle worker (random order) takes a uniformly random unit."""
        parts = sorted(idle)
        self._rng.shuffle(parts)
        for p in parts:
            options: list[Unit] = []
            for m in self._live.values():
                if m.train_worker is None and m.epoch < m.num_epochs and p not in m.visited and not self._gated(m):
                    options.append(self._train_unit(m, p))
                for e, todo in m.val_todo.items():
                    if p in todo:
                        options.append(self._val_unit(m, e, p))
            if options:
                self._dispatch(idle.pop(p), self._rng.choice(options), out)

    # ------------------------------------------------------------------ status
    @property
    def done(self) -> bool:
        """Every model is done, stopped or failed, and no unit is in flight.

        Vacuously True before any model is added. A stopped model's unit still running keeps
        this False, so the runtime waits for the checkpoint being written.
        """
        return not self._running and all(m.terminal for m in self._models.values())

    @property
    def running(self) -> dict[str, Unit]:
        """Worker id -> unit in flight (a copy)."""
        return dict(self._running)

    @property
    def workers(self) -> dict[str, int]:
        """Live worker id -> partition (a copy)."""
        return dict(self._workers)

    def model_ids(self) -> list[str]:
        """All models ever added, in add order."""
        return list(self._models)

    def model_status(self, model_id: str) -> ModelStatus:
        """State, progress and timing of one model; ``validated_epochs`` tells early stopping
        which epochs have all their val metrics."""
        m = self._model(model_id)
        P = self.num_partitions
        # the model's own workers (its train worker, its val units'), not a pass over all workers
        workers = ([m.train_worker] if m.train_worker is not None else []) + list(m.val_running.values())
        running = [(w, self._running[w]) for w in workers]
        return ModelStatus(
            model_id=m.model_id,
            state=m.state,
            num_epochs=m.num_epochs,
            epochs_trained=m.epoch,
            step=m.step(P),
            validated_epochs=tuple(sorted(e for e, n in m.val_finished.items() if n >= P)),
            running=tuple(sorted(running)),
            retries=sum(m.retries.values()),
            mean_train_s=m.train_sum / m.train_n if m.train_n else None,
            mean_val_s=m.val_sum / m.val_n if m.val_n else None,
        )

    def counts(self) -> dict[str, Any]:
        """Run-wide counters in O(1): ``progress()`` without its per-model ``models`` dict.

        ``units_total`` counts every unit of a live model and, of a stopped or failed one, the
        units it finished or still runs (its pending units are dropped).
        """
        by_state = {st: n for st, n in self._by_state.items() if n}
        return {
            "models_total": len(self._models),
            "models_done": sum(self._by_state[st] for st in _TERMINAL),
            "models_by_state": by_state,
            "units_done": self._units_done,
            "units_total": self._units_total,
            "units_running": len(self._running),
            "workers": len(self._workers),
            "workers_idle": len(self._workers) - len(self._running),
            "affinity_hits": self.affinity_hits,
        }

    def progress(self) -> dict[str, Any]:
        """``counts()`` plus per-model state, epoch and step (JSON-serialisable; O(M): a driver
        logging every unit wants ``counts()``)."""
        out = self.counts()
        models = {}
        for m in self._models.values():
            done, total = self._units(m)
            models[m.model_id] = {
                "state": m.state,
                "epoch": m.epoch,
                "num_epochs": m.num_epochs,
                "step": m.step(self.num_partitions),
                "units_done": done,
                "units_total": total,
            }
        out["models"] = models
        return out

    def idle_reason(self, worker_id: str) -> str | None:
        """Why ``worker_id`` is idle (None when it is busy)."""
        if worker_id not in self._workers:
            raise SchedulerError(f"unknown worker {worker_id!r}")
        if worker_id in self._running:
            return None
        p = self._workers[worker_id]
        if not self._models:
            return "no models added yet"
        if not self._live:
            return "all models are done, stopped or failed"
        if self._runnable_on(p):
            return f"runnable units wait for partition {p}: call assign()"
        # a diagnosis on request, not on the driver's path: a pass over the live models is fine
        training = [m for m in self._live.values() if m.epoch < m.num_epochs]
        if not training:
            return (f"no work for partition {p}: no model is still training and its val units "
                    f"for this partition are done or running")
        gated = sum(1 for m in training if self._gated(m))
        if gated:
            return (f"{gated} model(s) wait for their validation before training on (early stopping decides "
                    f"there); no other unit can use partition {p}")
        need = sum(1 for m in training if p not in m.visited)
        if need:
            return (f"{need} model(s) still need partition {p} this epoch, but each is training "
                    f"on another worker (a model trains on one worker at a time in MOP)")
        return (f"every training model ({len(training)}) has already visited partition {p} "
                f"this epoch; it is needed again when they start their next epoch")

    def explain_idle(self) -> str | None:
        """One line on why workers idle (and which partitions lack a worker), or None."""
        # Called by the driver after every event: counters only, no pass over the models.
        W = len(self._workers)
        n_idle = W - len(self._running)
        orphans = ([p for p in range(self.num_partitions) if p not in self._owner]
                   if len(self._owner) < self.num_partitions else [])
        parts = []
        if n_idle:
            head = f"{n_idle} of {W} workers idle"
            if not self._models:
                parts.append(f"{head}: no models added yet")
            elif not self._live:
                parts.append(f"{head}: all models are done, stopped or failed")
            elif self._n_training < W:
                n = self._n_training
                parts.append(
                    f"{head}: only {n} model{' is' if n == 1 else 's are'} training and a model "
                    f"trains on one worker at a time (MOP); add models or use fewer workers"
                    + ("; validation units fill idle workers when available" if self.validate
                       else ""))
            else:
                parts.append(
                    f"{head}: the training models that are not running have already visited "
                    f"these workers' partitions this epoch (transient)")
        if orphans:
            parts.append(f"partition(s) {orphans} have no worker: their units wait until a "
                         f"worker for them joins")
        return "; ".join(parts) or None

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything, JSON-serialisable; ``from_state_dict`` continues identically."""
        version, internal, gauss_next = self._rng.getstate()
        return {
            "version": _STATE_VERSION,
            "num_partitions": self.num_partitions,
            "seed": self.seed,
            "validate": self.validate,
            "policy": self.policy,
            "affinity": self.affinity,
            "val_priority": self.val_priority,
            "max_unit_retries": self.max_unit_retries,
            "rng": [version, list(internal), gauss_next],
            "models": [m.to_dict() for m in self._models.values()],
            "workers": [[w, p] for w, p in self._workers.items()],
            "running": [[w, u.to_dict()] for w, u in self._running.items()],
            "held": [[w, mid, step] for w, (mid, step) in self._held.items()],
            "durations": [self._train_sum, self._train_n, self._val_sum, self._val_n],
            "affinity_hits": self.affinity_hits,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> HopScheduler:
        """The exact scheduler ``state_dict()`` was taken from, units in flight included.

        For a resume after a driver crash, prefer a fresh scheduler plus ``restore_finished``
        replay of the journal: units that were in flight then are simply pending again.
        """
        if d.get("version") != _STATE_VERSION:
            raise SchedulerError(f"unsupported scheduler state version {d.get('version')!r}")
        s = cls(d["num_partitions"], seed=d["seed"], validate=d["validate"], policy=d["policy"],
                affinity=d["affinity"], val_priority=d["val_priority"],
                max_unit_retries=d["max_unit_retries"])
        version, internal, gauss_next = d["rng"]
        s._rng.setstate((version, tuple(internal), gauss_next))
        s._models = {md["model_id"]: _Model.from_dict(md) for md in d["models"]}
        s._live = {mid: m for mid, m in s._models.items() if not m.terminal}
        s._workers = {w: int(p) for w, p in d["workers"]}
        s._owner = {p: w for w, p in s._workers.items()}
        s._running = {w: Unit.from_dict(u) for w, u in d["running"]}
        s._held = {w: (mid, int(step)) for w, mid, step in d["held"]}
        s._train_sum, s._train_n, s._val_sum, s._val_n = d["durations"]
        s.affinity_hits = d["affinity_hits"]
        s._rebuild()  # indexes and counters are derived: recomputed, never stored
        return s

    # --------------------------------------------------------------- internals
    def _model(self, model_id: str) -> _Model:
        try:
            return self._models[model_id]
        except KeyError:
            raise SchedulerError(f"unknown model {model_id!r}") from None

    def _train_unit(self, m: _Model, p: int) -> Unit:
        return Unit(m.model_id, m.epoch, "train", p, m.step(self.num_partitions))

    def _val_unit(self, m: _Model, e: int, p: int) -> Unit:
        return Unit(m.model_id, e, "val", p, (e + 1) * self.num_partitions)

    def _dispatch(self, worker_id: str, unit: Unit, out: list[tuple[str, Unit]]) -> None:
        m = self._models[unit.model_id]
        if self._held.get(worker_id) == (unit.model_id, unit.step):
            self.affinity_hits += 1
        self._running[worker_id] = unit
        self._idle.discard(unit.partition)
        if m.state == "pending":
            m.state = "running"
        if unit.kind == "train":
            m.train_worker = worker_id
        else:
            todo = m.val_todo[unit.epoch]
            todo.remove(unit.partition)
            self._vals.taken(unit.partition)
            if not todo:
                del m.val_todo[unit.epoch]
            m.val_running[(unit.epoch, unit.partition)] = worker_id
        self._touch(m)
        out.append((worker_id, unit))

    def _take_running(self, worker_id: str, unit: Unit) -> None:
        running = self._running.get(worker_id)
        if running != unit:
            raise SchedulerError(
                f"worker {worker_id!r} is not running {unit} (it runs {running}); "
                f"stale or duplicate report?")
        del self._running[worker_id]
        self._idle.add(self._workers[worker_id])

    def _release(self, m: _Model, unit: Unit) -> None:
        if unit.kind == "train":
            m.train_worker = None
        else:
            m.val_running.pop((unit.epoch, unit.partition), None)

    def _requeue(self, m: _Model, unit: Unit) -> None:
        # A train unit needs no requeue: its partition is still unvisited and the step unchanged.
        if unit.kind == "val":
            m.val_todo.setdefault(unit.epoch, set()).add(unit.partition)
            m.val_todo = dict(sorted(m.val_todo.items()))  # keep epoch order (oldest first)
            self._vals.add(unit.partition, unit.epoch, m.tie, m.order, m.model_id)

    def _check_next_train(self, m: _Model, unit: Unit) -> None:
        expected = m.step(self.num_partitions)
        if (unit.epoch != m.epoch or unit.partition in m.visited or unit.step != expected
                or m.epoch >= m.num_epochs):
            raise SchedulerError(
                f"cannot restore {unit}: model is at epoch {m.epoch}, step {expected}, visited "
                f"{sorted(m.visited)} (journal out of order or for another run?)")

    def _check_val(self, m: _Model, unit: Unit) -> None:
        if unit.epoch >= m.epoch or unit.step != (unit.epoch + 1) * self.num_partitions:
            raise SchedulerError(f"cannot restore {unit}: epoch {unit.epoch} not trained yet "
                                 f"or wrong step")

    def _complete(self, m: _Model, unit: Unit) -> None:
        """Record a finished unit (from a worker or from the journal)."""
        P = self.num_partitions
        if unit.kind == "train":
            if m.counted:  # journal replay: the model waits (is counted) while it visits p
                self._free.count_visit(unit.partition)
            m.visited.add(unit.partition)
            if len(m.visited) == P:
                if m.counted:  # counted again with the new epoch's empty visited set
                    self._free.count_out(m.visited)
                    self._free.count_in(())
                finished_epoch = m.epoch
                m.epoch += 1
                m.visited = set()
                if self.validate and not m.terminal:
                    m.val_todo[finished_epoch] = set(range(P))
                    for p in range(P):
                        self._vals.add(p, finished_epoch, m.tie, m.order, m.model_id)
        else:
            if not m.terminal:
                todo = m.val_todo.get(unit.epoch)
                if todo is not None and unit.partition in todo:
                    todo.remove(unit.partition)  # journal replay: never dispatched
                    self._vals.taken(unit.partition)
                    if not todo:
                        del m.val_todo[unit.epoch]
            m.val_finished[unit.epoch] = m.val_finished.get(unit.epoch, 0) + 1
        if m.state == "pending":
            m.state = "running"
        self._maybe_finish(m)

    def _end(self, m: _Model, state: str) -> None:
        m.state = state
        for ps in m.val_todo.values():
            for p in ps:
                self._vals.taken(p)
        m.val_todo.clear()  # pending units are dropped; in-flight ones may still report
        self._live.pop(m.model_id, None)

    def _maybe_finish(self, m: _Model) -> None:
        if m.terminal:
            return
        if m.epoch >= m.num_epochs and not m.val_todo and not m.val_running:
            self._end(m, "done")

    def _observe(self, m: _Model, kind: str, duration: float) -> None:
        if kind == "train":
            m.train_sum += duration
            m.train_n += 1
            self._train_sum += duration
            self._train_n += 1
        else:
            m.val_sum += duration
            m.val_n += 1
            self._val_sum += duration
            self._val_n += 1

    def _gated(self, m: _Model) -> bool:
        """Whether the model's next epoch waits for the previous one's validation (see add_model)."""
        return (self.validate and m.epoch in m.gates and not m.visited
                and m.val_finished.get(m.epoch - 1, 0) < self.num_partitions)

    def _runnable_on(self, p: int) -> bool:
        return self._free.need(p) > 0 or self._vals.count(p) > 0

    def _val_pending(self, model_id: str, epoch: int, p: int) -> bool:
        """Whether a ValIndex entry still stands for a pending unit."""
        m = self._live.get(model_id)
        return m is not None and p in m.val_todo.get(epoch, ())

    def _units(self, m: _Model) -> tuple[int, int]:
        """(units done, units in total) of one model, as ``progress()`` reports them."""
        P = self.num_partitions
        done = m.step(P) + sum(m.val_finished.values())
        if m.terminal:
            # Pending units of stopped/failed models are dropped; in-flight ones still count.
            return done, done + m.n_running()
        return done, m.num_epochs * (P + (P if self.validate else 0))

    def _touch(self, m: _Model) -> None:
        """Bring the indexes, sums and counters in line with ``m`` after an event of ``m``.

        Called once at the end of every change to a model (add, dispatch, finish, failure,
        requeue, stop, replay). A model's candidacy, chain and remaining work depend only on
        its own state (run-wide means are applied when read), so no other model needs a visit.
        """
        P = self.num_partitions
        live = not m.terminal
        rem = (m.num_epochs - m.epoch) * P - len(m.visited) if live else 0
        t = m.train_sum / m.train_n if m.train_n else None
        v = m.val_sum / m.val_n if m.val_n else None

        # Waiting for a train unit: in the TrainIndex, keyed by chain.
        waiting = rem > 0 and m.train_worker is None and not self._gated(m)
        if waiting != m.counted:
            if waiting:
                self._free.count_in(m.visited)
            else:
                self._free.count_out(m.visited)
            m.counted = waiting
        if not waiting:
            self._free.drop(m.model_id)
        elif t is None:
            self._free.put(m.model_id, False, rem, m.tie, m.order)  # chain read as run mean x rem
        else:
            val = (v if v is not None else t * VAL_COST_PRIOR) if self.validate else 0.0
            self._free.put(m.model_id, True, rem * t + val, m.tie, m.order)

        # Contributions to the run's remaining work and to the counters.
        if live:
            val_left = ((m.num_epochs - m.epoch) * P + sum(len(ps) for ps in m.val_todo.values())
                        if self.validate else 0)
            rem_t, rem_u = (rem * t, 0) if t is not None else (0.0, rem)
            if v is not None:
                val_t, val_bt, val_u = val_left * v, 0.0, 0
            elif t is not None:
                val_t, val_bt, val_u = 0.0, val_left * t, 0
            else:
                val_t, val_bt, val_u = 0.0, 0.0, val_left
        else:
            rem_t, rem_u, val_t, val_bt, val_u = 0.0, 0, 0.0, 0.0, 0
        done, total = self._units(m)
        new = (rem_t, rem_u, val_t, val_bt, val_u, rem > 0, done, total, m.state)
        old = m.contrib
        if new == old:
            return
        if old:
            o_rem_t, o_rem_u, o_val_t, o_val_bt, o_val_u, o_training, o_done, o_total, o_state = old
            self._rem_timed.sub(o_rem_t)
            self._val_timed.sub(o_val_t)
            self._val_by_train.sub(o_val_bt)
            self._rem_untimed -= o_rem_u
            self._val_untimed -= o_val_u
            self._n_training -= o_training
            self._units_done -= o_done
            self._units_total -= o_total
            self._by_state[o_state] -= 1
        self._rem_timed.add(rem_t)
        self._val_timed.add(val_t)
        self._val_by_train.add(val_bt)
        self._rem_untimed += rem_u
        self._val_untimed += val_u
        self._n_training += rem > 0
        self._units_done += done
        self._units_total += total
        self._by_state[m.state] += 1
        m.contrib = new
