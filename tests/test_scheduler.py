"""Tests of the pure MOP hop scheduler, driven by a tiny discrete-event simulator.

The simulator keeps its own record of what ran (an oracle independent of the scheduler's
bookkeeping) and checks the MOP contract at every dispatch and after every ``assign()``.
Everything here runs in milliseconds.
"""

from __future__ import annotations

import copy
import heapq
import json
import math
import random
from collections import Counter

import pytest

from cerebro_tasks.mop.scheduler import POLICIES, HopScheduler, SchedulerError, Unit


def unit_duration(unit: Unit, cost: dict[str, float]) -> float:
    """Deterministic per-unit duration: model cost, val at 1/3, +-20% noise keyed by the unit."""
    key = f"{unit.model_id}/{unit.kind}/{unit.epoch}/{unit.partition}"
    noise = random.Random(key).uniform(0.8, 1.2)
    base = cost[unit.model_id] * (1 / 3 if unit.kind == "val" else 1.0)
    return base * noise


class Sim:
    """Simulated workers around a HopScheduler; asserts the MOP contract as it goes."""

    def __init__(self, sched: HopScheduler, num_workers: int, epochs: dict[str, int],
                 cost: dict[str, float] | None = None, pass_duration: bool = True,
                 gates: dict[str, tuple[int, ...]] | None = None) -> None:
        self.s = sched
        self.P = sched.num_partitions
        self.epochs = dict(epochs)
        self.gates = {m: tuple((gates or {}).get(m, ())) for m in epochs}
        self.cost = cost or {m: 1.0 for m in epochs}
        self.pass_duration = pass_duration
        self.t = 0.0
        self.seq = 0
        self.heap: list[tuple[float, int, str, Unit]] = []
        self.inflight: dict[str, tuple[float, Unit, int]] = {}  # worker -> (start, unit, seq)
        self.log: list[tuple[float, float, str, Unit]] = []  # finished: (start, end, worker, unit)
        self.dispatches: list[tuple[float, str, Unit]] = []
        self.trained: dict[str, list[Unit]] = {m: [] for m in epochs}  # in finish order
        self.validated: dict[str, set[tuple[int, int]]] = {m: set() for m in epochs}
        self.terminal: set[str] = set()  # models the test stopped or that failed
        for m, e in epochs.items():
            sched.add_model(m, e, gates=self.gates[m])
        for w in range(num_workers):
            sched.worker_joined(f"w{w}", w % self.P)

    # -- oracle ---------------------------------------------------------------
    def add_model(self, m: str, e: int, cost: float = 1.0, gates: tuple[int, ...] = ()) -> None:
        self.s.add_model(m, e, gates=gates)
        self.epochs[m], self.cost[m], self.gates[m] = e, cost, tuple(gates)
        self.trained[m], self.validated[m] = [], set()

    def _train_running(self, m: str) -> bool:
        return any(u.model_id == m and u.kind == "train" for _, u, _ in self.inflight.values())

    def gated(self, m: str) -> bool:
        """The gate rule from the records: a gated epoch starts once the previous is validated."""
        done = len(self.trained[m])
        cur = done // self.P
        return (self.s.validate and cur in self.gates.get(m, ()) and done % self.P == 0
                and sum(1 for ep, _ in self.validated[m] if ep == cur - 1) < self.P)

    def runnable(self, p: int) -> list[tuple[str, str]]:
        """Units the contract allows on partition p right now (oracle view)."""
        out = []
        for m, e in self.epochs.items():
            if m in self.terminal or self.s.model_status(m).state in ("stopped", "failed"):
                continue
            done = self.trained[m]
            cur = len(done) // self.P
            if cur < e and not self._train_running(m) and not self.gated(m):
                if p not in {u.partition for u in done if u.epoch == cur}:
                    out.append((m, "train"))
            if self.s.validate:
                running = {(u.epoch, u.partition) for _, u, _ in self.inflight.values()
                           if u.model_id == m and u.kind == "val"}
                for ep in range(cur):
                    if (ep, p) not in self.validated[m] and (ep, p) not in running:
                        out.append((m, "val"))
        return out

    def check_dispatch(self, w: str, u: Unit) -> None:
        P = self.P
        assert w not in self.inflight, "worker given two units"
        assert self.s.workers[w] == u.partition, "unit sent to a worker not owning its partition"
        assert u.model_id not in self.terminal
        done = self.trained[u.model_id]
        if u.kind == "train":
            assert not self._train_running(u.model_id), "two train units of one model at once"
            assert not self.gated(u.model_id), "train unit of a gated epoch before its validation"
            assert u.step == len(done), "train unit must read the newest checkpoint"
            assert u.epoch == len(done) // P
            assert u.partition not in {x.partition for x in done if x.epoch == u.epoch}
        else:
            assert u.kind == "val"
            assert len(done) >= (u.epoch + 1) * P, "val before its epoch's training finished"
            assert u.step == (u.epoch + 1) * P
            assert (u.epoch, u.partition) not in self.validated[u.model_id]

    def dispatch(self) -> list[tuple[str, Unit]]:
        out = self.s.assign()
        for w, u in out:
            self.check_dispatch(w, u)
            d = unit_duration(u, self.cost)
            self.inflight[w] = (self.t, u, self.seq)
            self.dispatches.append((self.t, w, u))
            heapq.heappush(self.heap, (self.t + d, self.seq, w, u))
            self.seq += 1
        # Work-conserving: no idle worker may have a runnable unit on its partition.
        for w, p in self.s.workers.items():
            if w not in self.inflight:
                assert not self.runnable(p), f"worker {w} idle although {self.runnable(p)} runnable"
                assert self.s.idle_reason(w) is not None
        return out

    def step(self) -> bool:
        """Finish the next unit (skipping ones whose worker was removed). False when none left."""
        while self.heap:
            end, seq, w, u = heapq.heappop(self.heap)
            if w not in self.inflight or self.inflight[w][2] != seq:
                continue  # its worker left or the unit failed; it was requeued
            start, _, _ = self.inflight.pop(w)
            self.t = end
            self.s.unit_finished(w, u, duration=(end - start) if self.pass_duration else None)
            self.log.append((start, end, w, u))
            if u.kind == "train":
                self.trained[u.model_id].append(u)
            else:
                self.validated[u.model_id].add((u.epoch, u.partition))
            return True
        return False

    def run(self, max_events: int | None = None) -> None:
        n = 0
        self.dispatch()
        while (max_events is None or n < max_events) and self.step():
            self.dispatch()
            n += 1

    def remove_worker(self, w: str) -> Unit | None:
        self.inflight.pop(w, None)
        return self.s.worker_left(w)

    def assignment_trace(self) -> list[tuple[float, str, Unit]]:
        return list(self.dispatches)

    # -- final checks -----------------------------------------------------------
    def check_complete(self, models: list[str] | None = None) -> None:
        P = self.P
        for m in models or list(self.epochs):
            e = self.epochs[m]
            steps = [u.step for u in self.trained[m]]
            assert steps == list(range(e * P)), f"{m}: steps {steps}"
            for ep in range(e):
                parts = sorted(u.partition for u in self.trained[m] if u.epoch == ep)
                assert parts == list(range(P)), f"{m} epoch {ep} partitions {parts}"
            if self.s.validate:
                assert self.validated[m] == {(ep, p) for ep in range(e) for p in range(P)}
            assert self.s.model_status(m).state == "done"
        # No unit finished twice (a re-run train unit may carry a later step, so key without it).
        counts = Counter((u.model_id, u.epoch, u.kind, u.partition) for u in self.log_units())
        assert all(c == 1 for c in counts.values()), [u for u, c in counts.items() if c > 1]

    def log_units(self) -> list[Unit]:
        return [u for _, _, _, u in self.log]


def hetero(n: int, seed: int = 1) -> tuple[dict[str, int], dict[str, float]]:
    rng = random.Random(seed)
    epochs = {f"m{i}": rng.choice([1, 2, 3]) for i in range(n)}
    cost = {m: 10 ** rng.uniform(0, 1) for m in epochs}
    return epochs, cost


def make(P: int = 4, **kw) -> HopScheduler:
    return HopScheduler(P, **kw)


# ----------------------------------------------------------------------------- basics
@pytest.mark.parametrize("policy", ["critical", "random"])
@pytest.mark.parametrize("validate", [True, False])
def test_full_run_respects_mop_contract(policy: str, validate: bool) -> None:
    epochs, cost = hetero(7)
    sim = Sim(make(4, seed=3, policy=policy, validate=validate), 4, epochs, cost)
    sim.run()
    sim.check_complete()
    assert sim.s.done
    prog = sim.s.progress()
    assert prog["units_done"] == prog["units_total"] == len(sim.log)
    assert prog["models_done"] == 7
    if not validate:
        assert all(u.kind == "train" for u in sim.log_units())


def test_without_reported_durations_it_still_completes() -> None:
    epochs, cost = hetero(6, seed=9)
    sim = Sim(make(3, seed=1), 3, epochs, cost, pass_duration=False)
    sim.run()
    sim.check_complete()
    assert sim.s.model_status("m0").mean_train_s is None


def test_train_units_of_a_model_never_overlap_and_val_overlaps_next_epoch() -> None:
    sim = Sim(make(4, seed=0), 4, {"a": 3})
    sim.run()
    sim.check_complete()
    train = sorted((s, e) for s, e, _, u in sim.log if u.kind == "train")
    for (s1, e1), (s2, _) in zip(train, train[1:]):
        assert s2 >= e1 - 1e-12
    # Validation of epoch 0 ran beside training of epoch 1 (no barrier).
    val0 = [(s, e) for s, e, _, u in sim.log if u.kind == "val" and u.epoch == 0]
    tr1 = [(s, e) for s, e, _, u in sim.log if u.kind == "train" and u.epoch == 1]
    assert any(vs < te and ts < ve for vs, ve in val0 for ts, te in tr1)


def test_no_global_epoch_barrier() -> None:
    # A cheap model moves on to later epochs while an expensive one is still in epoch 0.
    sim = Sim(make(2, seed=0), 2, {"slow": 1, "fast": 3}, {"slow": 50.0, "fast": 1.0})
    sim.run()
    sim.check_complete()
    slow_trained = max(e for _, e, _, u in sim.log if u.model_id == "slow" and u.kind == "train")
    assert any(s < slow_trained for s, _, _, u in sim.log
               if u.model_id == "fast" and u.epoch >= 1 and u.kind == "train")


def test_longest_remaining_work_goes_first() -> None:
    s = make(1, seed=0)
    s.add_model("short", 1)
    s.add_model("long", 3)
    s.worker_joined("w0", 0)
    [(w, u)] = s.assign()
    assert u.model_id == "long" and u.kind == "train" and u.step == 0


def test_observed_durations_drive_priority() -> None:
    # Both models have equal unit counts left; the one observed slower must go first.
    s = make(2, seed=0, validate=False, affinity=False)
    s.add_model("cheap", 2)
    s.add_model("dear", 2)
    s.worker_joined("w0", 0)
    s.worker_joined("w1", 1)
    first = dict((u.model_id, (w, u)) for w, u in s.assign())
    s.unit_finished(*first["cheap"], duration=1.0)
    s.unit_finished(*first["dear"], duration=9.0)
    out = s.assign()
    # Each now needs the other partition; both get one. Finish the epoch and check order on a
    # single free worker.
    for w, u in out:
        s.unit_finished(w, u, duration=1.0 if u.model_id == "cheap" else 9.0)
    s.worker_left("w1")
    [(w, u)] = s.assign()
    assert u.model_id == "dear"


# ------------------------------------------------------------------------ determinism
def _trace(seed: int, policy: str = "critical") -> list:
    epochs, cost = hetero(9, seed=5)
    sim = Sim(make(4, seed=seed, policy=policy), 4, epochs, cost)
    sim.run()
    return [(round(t, 9), w, u) for t, w, u in sim.assignment_trace()]


@pytest.mark.parametrize("policy", ["critical", "random"])
def test_same_seed_same_assignments_different_seed_differs(policy: str) -> None:
    assert _trace(11, policy) == _trace(11, policy)
    assert _trace(11, policy) != _trace(12, policy)


# ------------------------------------------------------------------ dynamic model set
def test_models_added_mid_run_and_stopped() -> None:
    epochs, cost = hetero(4, seed=2)
    sim = Sim(make(4, seed=1), 4, epochs, cost)
    sim.run(max_events=10)
    sim.add_model("late", 2, cost=2.0)
    sim.run(max_events=10)
    # Stop m0 while it has pending units (possibly one running).
    assert sim.s.model_status("m0").state in ("running", "pending")
    running_m0 = [(w, u) for w, (_, u, _) in sim.inflight.items() if u.model_id == "m0"]
    sim.s.stop_model("m0")
    sim.terminal.add("m0")
    assert sim.s.model_status("m0").state == "stopped"
    n_before = len([u for u in sim.log_units() if u.model_id == "m0"])
    sim.run()
    after = [u for u in sim.log_units() if u.model_id == "m0"]
    # Only the units already running at stop time may still finish; nothing new was dispatched.
    assert len(after) - n_before == len(running_m0)
    assert all(u.model_id != "m0" or t <= sim.t for t, _, u in sim.dispatches)
    sim.check_complete([m for m in sim.epochs if m != "m0"])
    assert sim.s.done
    prog = sim.s.progress()
    assert prog["models_by_state"] == {"done": 4, "stopped": 1}
    assert prog["units_done"] == prog["units_total"]


def test_stopped_model_with_running_unit_keeps_done_false_until_it_reports() -> None:
    s = make(1, seed=0)
    s.add_model("a", 1)
    s.worker_joined("w0", 0)
    [(w, u)] = s.assign()
    s.stop_model("a")
    assert s.model_status("a").state == "stopped"
    assert not s.done  # the checkpoint is still being written
    assert s.assign() == []
    s.unit_finished(w, u)
    assert s.done
    assert s.model_status("a").step == 1


def test_done_semantics() -> None:
    s = make(2)
    assert s.done  # nothing to do
    s.add_model("a", 1)
    assert not s.done
    s.stop_model("a")
    assert s.done
    s.add_model("b", 1)  # TPE may add a batch after everything finished
    assert not s.done


# ---------------------------------------------------------------------- fault tolerance
def test_worker_left_mid_unit_is_rerun_exactly_once() -> None:
    epochs, cost = hetero(6, seed=4)
    sim = Sim(make(4, seed=2), 4, epochs, cost)
    sim.run(max_events=12)
    w, (_, lost, _) = next(iter(sorted(sim.inflight.items())))
    p = sim.s.workers[w]
    assert sim.remove_worker(w) == lost
    # While partition p has no worker, nothing of partition p is dispatched.
    n = len(sim.dispatches)
    sim.run(max_events=8)
    assert all(u.partition != p for _, _, u in sim.dispatches[n:])
    msg = sim.s.explain_idle()
    assert msg is not None and f"[{p}]" in msg and "no worker" in msg
    sim.s.worker_joined(w + "-new", p)
    sim.run()
    sim.check_complete()
    # The lost unit is re-run exactly once. A lost *train* unit may come back with a later
    # step: while its partition had no worker the model trained on other partitions.
    key = (lost.model_id, lost.epoch, lost.kind, lost.partition)
    reruns = [u for u in sim.log_units() if (u.model_id, u.epoch, u.kind, u.partition) == key]
    assert len(reruns) == 1
    assert reruns[0].step >= lost.step


def test_worker_rejoin_same_id_requeues_its_unit() -> None:
    s = make(2, seed=0)
    s.add_model("a", 1)
    s.worker_joined("w0", 0)
    s.worker_joined("w1", 1)
    [(w, u)] = s.assign()
    s.worker_joined(w, u.partition)  # restarted: its unit went back to pending
    assert s.running == {}
    [(w2, u2)] = s.assign()
    assert (u2.model_id, u2.epoch, u2.kind, u2.step) == ("a", 0, "train", 0)


def test_double_owner_and_bad_events_raise() -> None:
    s = make(2)
    s.add_model("a", 1)
    with pytest.raises(SchedulerError):
        s.add_model("a", 1)
    with pytest.raises(SchedulerError):
        s.add_model("b", 0)
    s.worker_joined("w0", 0)
    with pytest.raises(SchedulerError):
        s.worker_joined("x", 0)  # partition 0 still owned by live w0
    with pytest.raises(SchedulerError):
        s.worker_joined("w9", 2)
    with pytest.raises(SchedulerError):
        HopScheduler(2, policy="fifo")
    [(w, u)] = s.assign()
    with pytest.raises(SchedulerError):
        s.unit_finished(w, Unit("a", 0, "train", 0, 5))  # not what it runs
    s.unit_finished(w, u)
    with pytest.raises(SchedulerError):
        s.unit_finished(w, u)  # duplicate report
    with pytest.raises(SchedulerError):
        s.worker_left("nobody")


def test_unit_failed_retries_then_marks_model_failed() -> None:
    s = make(2, seed=0, max_unit_retries=2)
    s.add_model("bad", 1)
    s.add_model("good", 1)
    s.worker_joined("w0", 0)
    s.worker_joined("w1", 1)
    fails = 0
    while not s.done:
        for w, u in s.assign():
            if u.model_id == "bad" and u.partition == 1:
                fails += 1
                assert s.unit_failed(w, u) is (fails <= 2)
                if fails <= 2:
                    assert s.model_status("bad").retries == fails
            else:
                s.unit_finished(w, u)
    assert fails == 3
    assert s.model_status("bad").state == "failed"
    assert s.model_status("good").state == "done"
    assert s.progress()["models_done"] == 2


def test_unit_failed_retry_reruns_same_unit() -> None:
    s = make(1, seed=0, validate=False)
    s.add_model("a", 1)
    s.worker_joined("w0", 0)
    [(w, u)] = s.assign()
    assert s.unit_failed(w, u)
    assert s.assign() == [(w, u)]


# ------------------------------------------------------------------ fewer models than workers
def test_one_model_four_workers_completes_and_explains_idling() -> None:
    sim = Sim(make(4, seed=0), 4, {"solo": 2}, {"solo": 1.0})
    first = sim.dispatch()
    assert len(first) == 1
    msg = sim.s.explain_idle()
    assert msg is not None and msg.startswith("3 of 4 workers idle")
    assert "only 1 model" in msg and "fewer workers" in msg
    idle = [w for w in sim.s.workers if w not in sim.inflight]
    assert all("another worker" in sim.s.idle_reason(w) for w in idle)
    while sim.step():
        sim.dispatch()
    sim.check_complete()
    # Validation of epoch 0 used otherwise idle workers while training went on.
    assert any(u.kind == "val" for _, _, u in sim.dispatches)
    assert sim.s.explain_idle() == "4 of 4 workers idle: all models are done, stopped or failed"


def test_no_models_and_no_workers() -> None:
    s = make(3)
    assert s.assign() == []
    s.worker_joined("w0", 0)
    assert s.explain_idle().startswith("1 of 1 workers idle: no models added yet")
    assert s.idle_reason("w0") == "no models added yet"


# ---------------------------------------------------------------------- persistence
def test_state_dict_round_trip_mid_run_continues_identically() -> None:
    epochs, cost = hetero(8, seed=6)
    sim = Sim(make(4, seed=9), 4, epochs, cost)
    sim.run(max_events=25)
    assert sim.inflight  # mid-run, units in flight
    state = json.loads(json.dumps(sim.s.state_dict()))
    twin = copy.deepcopy(sim)
    twin.s = HopScheduler.from_state_dict(state)
    assert twin.s.state_dict() == state
    sim.run()
    twin.run()
    assert twin.dispatches == sim.dispatches
    assert twin.s.state_dict() == sim.s.state_dict()
    twin.check_complete()


def test_restore_finished_replay_matches_and_continues() -> None:
    epochs, cost = hetero(5, seed=7)
    sim = Sim(make(3, seed=4), 3, epochs, cost)
    sim.run(max_events=30)
    journal = sim.log_units()
    # Resume: a fresh scheduler, same models, journal replayed, workers re-join.
    s2 = make(3, seed=4)
    for m, e in epochs.items():
        s2.add_model(m, e)
    for u in journal:
        s2.restore_finished(u)
    # the indexes the replay built incrementally are the ones a rebuild from the state gives
    assert _derived(HopScheduler.from_state_dict(s2.state_dict())) == _derived(s2)
    for m in epochs:
        a, b = sim.s.model_status(m), s2.model_status(m)
        assert (a.epochs_trained, a.step, a.validated_epochs) == \
            (b.epochs_trained, b.step, b.validated_epochs)
    resumed = Sim(s2, 0, {}, {})
    resumed.epochs, resumed.cost = dict(epochs), dict(cost)
    resumed.trained = {m: [u for u in journal if u.model_id == m and u.kind == "train"]
                       for m in epochs}
    resumed.validated = {m: {(u.epoch, u.partition) for u in journal
                             if u.model_id == m and u.kind == "val"} for m in epochs}
    resumed.log = [(0.0, 0.0, "journal", u) for u in journal]
    for w in range(3):
        s2.worker_joined(f"r{w}", w)
    resumed.run()
    resumed.check_complete()  # every unit exactly once across journal + resumed run


def test_restore_finished_rejects_out_of_order_journal() -> None:
    s = make(2)
    s.add_model("a", 2)
    with pytest.raises(SchedulerError):
        s.restore_finished(Unit("a", 0, "train", 0, 1))  # step 0 first
    s.restore_finished(Unit("a", 0, "train", 1, 0))
    with pytest.raises(SchedulerError):
        s.restore_finished(Unit("a", 0, "train", 1, 1))  # partition 1 visited already
    with pytest.raises(SchedulerError):
        s.restore_finished(Unit("a", 0, "val", 0, 2))  # epoch 0 not trained yet
    s.restore_finished(Unit("a", 0, "train", 0, 1))
    s.restore_finished(Unit("a", 0, "val", 0, 2))
    with pytest.raises(SchedulerError):
        s.restore_finished(Unit("a", 0, "val", 0, 2))  # twice
    assert s.model_status("a").step == 2
    with pytest.raises(SchedulerError):
        s.restore_finished(Unit("zzz", 0, "train", 0, 0))


# ------------------------------------------------------------------------- options
def test_affinity_keeps_model_on_worker_at_epoch_boundary() -> None:
    s = make(2, seed=0, validate=False, affinity=True)
    s.add_model("a", 3)
    s.worker_joined("w0", 0)
    s.worker_joined("w1", 1)
    last_worker = None
    while not s.done:
        for w, u in s.assign():
            if u.step % 2 == 0 and last_worker is not None:
                assert w == last_worker  # first unit of an epoch stays where the model is
            s.unit_finished(w, u)
            last_worker = w
    assert s.affinity_hits == 2


def _critical_setup(val_priority: str) -> HopScheduler:
    """big (5 epochs) is critical; s2, s3 (1 epoch) have slack; s1's val units are pending."""
    s = make(2, seed=0, val_priority=val_priority)
    for m, e in [("big", 5), ("s1", 1), ("s2", 1), ("s3", 1)]:
        s.add_model(m, e)
    s.restore_finished(Unit("s1", 0, "train", 0, 0))
    s.restore_finished(Unit("s1", 0, "train", 1, 1))
    s.restore_finished(Unit("big", 0, "train", 0, 0))  # big needs partition 1 next
    s.worker_joined("w0", 0)
    s.worker_joined("w1", 1)
    return s


def test_critical_train_first_then_val_before_slack_train() -> None:
    got = dict(_critical_setup("auto").assign())
    assert got["w1"] == Unit("big", 0, "train", 1, 1)
    assert got["w0"] == Unit("s1", 0, "val", 0, 2)  # val beats s2/s3, which have slack


def test_filler_val_runs_only_where_no_train_can() -> None:
    got = dict(_critical_setup("filler").assign())
    assert got["w1"] == Unit("big", 0, "train", 1, 1)
    assert got["w0"].kind == "train" and got["w0"].model_id in ("s2", "s3")


def test_val_prefers_checkpoint_the_worker_holds() -> None:
    s = make(2, seed=0)
    s.add_model("a", 1)
    s.worker_joined("w0", 0)
    s.worker_joined("w1", 1)
    [(w, u)] = s.assign()
    s.unit_finished(w, u)
    [(w, u)] = s.assign()
    s.unit_finished(w, u)  # epoch 0 done on w: it holds ckpt-2 of a
    got = dict(s.assign())
    assert got[w] == Unit("a", 0, "val", u.partition, 2)
    assert s.affinity_hits == 1


def test_progress_and_status_are_json_serialisable() -> None:
    epochs, cost = hetero(3, seed=8)
    sim = Sim(make(2, seed=0), 2, epochs, cost)
    sim.run(max_events=5)
    json.dumps(sim.s.progress())
    st = sim.s.model_status("m0")
    assert st.num_epochs == epochs["m0"] and st.state in ("pending", "running", "done")


def test_a_gated_epoch_waits_for_the_previous_validation_while_others_train():
    """Early stopping's decision epochs: the model's next epoch starts only once the last is validated."""

    def run(gates):
        s = HopScheduler(2, seed=0)
        s.add_model("g", 3, gates=gates)
        s.add_model("o", 3)
        s.worker_joined("w0", 0)
        s.worker_joined("w1", 1)
        trace, running = [], []
        while not s.done:
            running += s.assign()
            w, u = running.pop(0)  # one at a time, oldest first
            trace.append((u.model_id, u.epoch, u.kind))
            s.unit_finished(w, u, duration=1.0)
        return trace, s

    free, _ = run(())
    assert free.index(("g", 1, "train")) < free.index(("g", 0, "val"))  # without a gate validation lags
    gated, s = run((1,))
    assert gated.index(("g", 0, "val")) < gated.index(("g", 1, "train"))
    assert gated.index(("o", 1, "train")) < gated.index(("g", 1, "train"))  # meanwhile the other model trained
    assert HopScheduler.from_state_dict(s.state_dict()).state_dict() == s.state_dict()  # gates round-trip


# --------------------------------------------------------- indexes (sublinear assign())
def _live_models(sim: Sim) -> list[str]:
    return [m for m in sim.epochs if m not in sim.terminal and sim.s.model_status(m).state != "done"]


def _brute_counts(sim: Sim) -> dict:
    """counts() recomputed from the simulator's own records (finished, in flight, per model)."""
    P, s = sim.P, sim.s
    per_val = P if s.validate else 0
    by_state: dict[str, int] = {}
    total = 0
    for m, e in sim.epochs.items():
        st = s.model_status(m).state
        by_state[st] = by_state.get(st, 0) + 1
        done = len(sim.trained[m]) + len(sim.validated[m])
        running = sum(1 for _, u, _ in sim.inflight.values() if u.model_id == m)
        total += done + running if st in ("stopped", "failed") else e * (P + per_val)
    return {
        "models_total": len(sim.epochs),
        "models_done": sum(n for st, n in by_state.items() if st in ("done", "stopped", "failed")),
        "models_by_state": by_state,
        "units_done": len(sim.log),
        "units_total": total,
        "units_running": len(sim.inflight),
        "workers": len(s.workers),
        "workers_idle": len(s.workers) - len(sim.inflight),
        "affinity_hits": s.affinity_hits,
    }


def _chains(sim: Sim) -> tuple[dict[str, float], float, int]:
    """The documented chain of every live model with train units left, the run's remaining work
    per worker and how many models still train: the policy's inputs recomputed from scratch."""
    P, s = sim.P, sim.s
    train = [e - s for s, e, _, u in sim.log if u.kind == "train"]
    val = [e - s for s, e, _, u in sim.log if u.kind == "val"]
    run_t = sum(train) / len(train) if train else 1.0
    ratio = sum(val) / len(val) / run_t if val and train else 1 / 3
    chain, total = {}, 0.0
    for m in _live_models(sim):
        st = s.model_status(m)
        rem = sim.epochs[m] * P - len(sim.trained[m])
        t = st.mean_train_s if st.mean_train_s is not None else run_t
        running = {(u.epoch, u.partition) for _, u, _ in sim.inflight.values() if u.model_id == m}
        cur = len(sim.trained[m]) // P
        val_left = (sim.epochs[m] - cur) * P + sum(
            1 for ep in range(cur) for p in range(P) if (ep, p) not in sim.validated[m] | running)
        total += rem * t + val_left * (st.mean_val_s if st.mean_val_s is not None else t * ratio)
        if rem > 0:
            if st.mean_train_s is None:
                chain[m] = run_t * (rem + 1 / 3)
            else:
                chain[m] = rem * t + (st.mean_val_s if st.mean_val_s is not None else t / 3)
    return chain, total / max(1, len(s.workers)), len(chain)


def _expect_single(sim: Sim, p: int) -> tuple[str | None, set[str]]:
    """What the policy must place on partition p, the only idle one: ("train", models allowed)
    (the longest chain among those it should consider), ("val", {}) or (None, {})."""
    s = sim.s
    chain, per_worker, n_training = _chains(sim)
    runnable = sim.runnable(p)
    eligible = {m: chain[m] for m, k in runnable if k == "train"}
    has_val = any(k == "val" for _, k in runnable)

    def longest(cands: dict[str, float]) -> set[str]:
        top = max(cands.values())
        return {m for m, c in cands.items() if math.isclose(c, top, rel_tol=1e-9)}

    if s.val_priority == "auto":
        if n_training <= len(s.workers):
            crit = eligible
        else:
            cut = 0.8 * per_worker
            if any(math.isclose(c, cut, rel_tol=1e-9) for c in eligible.values()):
                return "skip", set()  # on the knife's edge: rounding may go either way
            crit = {m: c for m, c in eligible.items() if c >= cut}
        if crit:
            return "train", longest(crit)
        if has_val:
            return "val", set()
    if eligible:
        return "train", longest(eligible)
    return ("val" if has_val else None), set()


def _chaos(seed: int, policy: str = "critical", val_priority: str = "auto", roundtrip_every: int = 0,
           steps: int = 4000, check_choice: bool = True) -> list:
    """Random worker loss/rejoin, unit failures, stops, gated models and models added mid-run.

    After every assign(): work conservation against the simulator's oracle (Sim.dispatch), the
    counters against a recount, and, when a single worker was idle, that it got what the policy
    says (longest chain among the models it should consider, or a val unit). Returns the trace.
    """
    rng = random.Random(seed)
    P = 3
    epochs, cost = hetero(9, seed)
    gates = {m: (1,) for m in list(epochs)[::3]}
    sim = Sim(make(P, seed=seed, policy=policy, val_priority=val_priority, max_unit_retries=1), P,
              epochs, cost, gates=gates)
    sim.dispatch()
    gone: dict[int, str] = {}
    added = 0
    for i in range(steps):
        r = rng.random()
        if r < 0.03 and sim.inflight:
            w = rng.choice(sorted(sim.inflight))
            gone[sim.s.workers[w]] = w
            sim.remove_worker(w)
        elif r < 0.06 and gone:
            p = rng.choice(sorted(gone))
            sim.s.worker_joined(gone.pop(p) + "'", p)
        elif r < 0.08 and sim.inflight:
            w = rng.choice(sorted(sim.inflight))
            _, u, _ = sim.inflight.pop(w)
            if not sim.s.unit_failed(w, u):
                sim.terminal.add(u.model_id)
        elif r < 0.09:
            live = _live_models(sim)
            if live:
                m = rng.choice(live)
                sim.s.stop_model(m)
                sim.terminal.add(m)
        elif r < 0.12 and added < 6:
            sim.add_model(f"x{added}", rng.choice([1, 2, 3]), cost=rng.uniform(1, 10),
                          gates=rng.choice([(), (1,), (1, 2)]))
            added += 1
        elif not sim.step():
            if not gone:
                break
            for p in sorted(gone):
                sim.s.worker_joined(gone.pop(p) + "'", p)
        if roundtrip_every and i % roundtrip_every == 0:
            state = json.loads(json.dumps(sim.s.state_dict()))
            before = _derived(sim.s)
            sim.s = HopScheduler.from_state_dict(state)
            assert _derived(sim.s) == before, "rebuilt indexes differ from the incremental ones"
        idle = [p for w, p in sim.s.workers.items() if w not in sim.inflight]
        expect = _expect_single(sim, idle[0]) if check_choice and policy == "critical" and len(idle) == 1 else None
        out = sim.dispatch()
        assert sim.s.counts() == _brute_counts(sim)
        _check_explain_idle(sim)
        if expect is not None and expect[0] != "skip":
            kind, allowed = expect
            assert [u.kind for _, u in out] == ([kind] if kind else [])
            if kind == "train":
                assert out[0][1].model_id in allowed, (out, allowed)
    else:
        raise AssertionError("simulation did not finish")
    assert sim.s.done
    sim.check_complete([m for m in sim.epochs if m not in sim.terminal])
    for m in sim.terminal:
        assert sim.s.model_status(m).state in ("stopped", "failed")
    assert sim.s.counts() == _brute_counts(sim)
    prog = sim.s.progress()
    assert prog["units_done"] == prog["units_total"]
    assert prog["models_done"] == prog["models_total"] == len(sim.epochs)
    return [(round(t, 9), w, u) for t, w, u in sim.dispatches]


def _check_explain_idle(sim: Sim) -> None:
    """explain_idle() from counters says what a look at every model and worker says."""
    s = sim.s
    W = len(s.workers)
    idle = [w for w in s.workers if w not in sim.inflight]
    orphans = sorted(set(range(sim.P)) - set(s.workers.values()))
    training = [m for m in _live_models(sim) if len(sim.trained[m]) < sim.epochs[m] * sim.P]
    msg = s.explain_idle()
    if not idle and not orphans:
        assert msg is None
        return
    assert msg is not None
    if idle:
        assert msg.startswith(f"{len(idle)} of {W} workers idle")
        if _live_models(sim) and len(training) < W:
            assert f"only {len(training)} model" in msg
    if orphans:
        assert f"partition(s) {orphans} have no worker" in msg


def _derived(s: HopScheduler) -> tuple:
    """Everything the scheduler derives from its state (indexes, sums, counters), comparable."""
    P = s.num_partitions
    vals = [sorted({e for e in s._vals._heaps[p] if s._val_pending(e[3], e[0], p)}) for p in range(P)]
    return ([s._free.need(p) for p in range(P)], [s._vals.count(p) for p in range(P)], vals,
            sorted(s._free._entry.values()), s._per_worker(), s._n_training, sorted(s._idle), s.counts(),
            [m.contrib for m in s._models.values()], [m.counted for m in s._models.values()])


@pytest.mark.parametrize("val_priority", ["auto", "filler"])
@pytest.mark.parametrize("seed", range(6))
def test_chaos_work_conserving_counters_and_choices(seed: int, val_priority: str) -> None:
    _chaos(seed, val_priority=val_priority)


@pytest.mark.parametrize("seed", range(3))
def test_chaos_random_policy_work_conserving(seed: int) -> None:
    _chaos(seed, policy="random")


@pytest.mark.parametrize("seed", range(3))
def test_chaos_is_deterministic_and_survives_state_dict_round_trips(seed: int) -> None:
    plain = _chaos(seed, check_choice=False)
    assert _chaos(seed, check_choice=False) == plain
    # restored from its state_dict every 7 events (indexes rebuilt, compared): same schedule
    assert _chaos(seed, roundtrip_every=7, check_choice=False) == plain


def test_state_dict_round_trip_rebuilds_the_same_indexes() -> None:
    epochs, cost = hetero(12, seed=3)
    sim = Sim(make(4, seed=2), 4, epochs, cost, gates={"m1": (1,), "m4": (1, 2)})
    sim.run(max_events=60)
    twin = HopScheduler.from_state_dict(json.loads(json.dumps(sim.s.state_dict())))
    assert _derived(twin) == _derived(sim.s)


def test_index_never_hands_out_a_stale_unit() -> None:
    """Index entries go stale lazily (a model stopped, training elsewhere or done with the
    partition; a val unit taken, dropped or requeued): none may be handed out."""
    s = make(2, seed=0)
    s.add_model("top", 6)  # the longest chain: its entry heads the index
    s.add_model("mid", 4)
    s.add_model("low", 1)
    s.worker_joined("w0", 0)
    [(_, top0)] = s.assign()
    assert top0.model_id == "top"
    s.worker_joined("w1", 1)
    [(_, mid1)] = s.assign()  # top trains on w0 (its entry is stale): the next chain
    assert mid1.model_id == "mid" and mid1.partition == 1
    s.unit_finished("w1", mid1, duration=1.0)
    # mid waits again with the longest waiting chain, but has visited partition 1
    assert s.assign() == [("w1", Unit("low", 0, "train", 1, 0))]
    s.stop_model("top")  # stopped while training: its unit may finish, nothing new
    s.unit_finished("w0", top0, duration=2.0)
    assert s.assign() == [("w0", Unit("mid", 0, "train", 0, 1))]

    # val units of a stopped model: pending (indexed) on both partitions, then dropped
    s = make(2, seed=0)
    s.add_model("a", 1)
    s.add_model("b", 2)
    s.restore_finished(Unit("a", 0, "train", 0, 0))
    s.restore_finished(Unit("a", 0, "train", 1, 1))
    s.stop_model("a")
    s.worker_joined("w0", 0)
    s.worker_joined("w1", 1)
    [(w, u)] = s.assign()  # b trains on one worker at a time; nothing else may run
    assert u.model_id == "b" and u.kind == "train"
    assert s.idle_reason("w1" if w == "w0" else "w0") is not None

    # a val unit taken through affinity (its heap entry stays), failed, requeued, finished
    s = make(2, seed=0)
    s.add_model("a", 1)
    s.worker_joined("w0", 0)
    s.worker_joined("w1", 1)
    for _ in range(2):
        [(w, u)] = s.assign()
        s.unit_finished(w, u, duration=1.0)
    got = dict(s.assign())  # w holds ckpt-2: its val unit through affinity, the other by index
    assert got[w] == Unit("a", 0, "val", u.partition, 2) and len(got) == 2
    assert s.unit_failed(w, got[w])
    assert s.assign() == [(w, got[w])]  # requeued once, handed out once
    for w2, u2 in got.items():
        s.unit_finished(w2, u2, duration=0.5)
    assert s.assign() == [] and s.done
    assert s.progress()["units_done"] == 4


def test_heap_compaction_keeps_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long journal replay supersedes many entries and compacts the heaps: same schedule as
    without compaction."""
    from cerebro_tasks.mop import sched_index

    def run() -> list:
        s = make(4, seed=5, validate=False)
        for i in range(60):
            s.add_model(f"m{i}", 3)
        for i in range(60):  # every model through most of epoch 0, waiting all along
            for p in range(3):
                s.restore_finished(Unit(f"m{i}", 0, "train", p, p))
        for p in range(4):
            s.worker_joined(f"w{p}", p)
        trace = []
        while not s.done:
            for w, u in s.assign():
                trace.append((w, u))
                s.unit_finished(w, u, duration=1.0 + int(u.model_id[1:]) % 3)
        return trace

    compacted = run()
    assert len(compacted) == 60 * 12 - 60 * 3
    monkeypatch.setattr(sched_index.TrainIndex, "_maybe_compact", lambda self: None)
    assert run() == compacted
