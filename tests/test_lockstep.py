"""Lockstep with simulated workers: real durations change, the schedule does not (milliseconds)."""

from __future__ import annotations

import heapq
import random

import pytest

from cerebro_tasks.mop.lockstep import Lockstep
from cerebro_tasks.mop.scheduler import HopScheduler, Unit

COST = {"m0": 1.0, "m1": 2.0, "m2": 0.5, "m3": 1.5, "m4": 1.0}


def cost(unit: Unit) -> float:
    return COST[unit.model_id] * (1.0 if unit.kind == "train" else 1 / 3)


def run(noise_seed: int | None, P: int = 3, epochs: int = 3, add_on_done: bool = False,
        lockstep: bool = True) -> list[tuple[str, Unit]]:
    """Drive the scheduler with real durations = cost x noise; returns the dispatch order.

    ``noise_seed=None``: real durations are the costs themselves and there is no lockstep, the
    simulation a lockstep run must reproduce. ``lockstep=False``: results reach the scheduler in
    real finish order (the adaptive schedule).
    """
    rng = random.Random(noise_seed)
    s = HopScheduler(P, seed=7)
    for m in ("m0", "m1", "m2"):
        s.add_model(m, epochs)
    for p in range(P):
        s.worker_joined(f"w{p}", p)
    noisy = noise_seed is not None
    lock = Lockstep(cost) if noisy and lockstep else None
    trace: list[tuple[str, Unit]] = []
    heap: list[tuple[float, str, Unit]] = []
    clock = 0.0

    def dispatch() -> None:
        for worker_id, unit in s.assign():
            trace.append((worker_id, unit))
            real = cost(unit) * (rng.uniform(0.3, 3.0) if noisy else 1.0)
            heapq.heappush(heap, (clock + real, worker_id, unit))
            if lock:
                lock.dispatched(worker_id, unit)

    def finished(worker_id: str, unit: Unit, duration: float) -> None:
        s.unit_finished(worker_id, unit, duration)
        status = s.model_status(unit.model_id)
        if add_on_done and status.state == "done" and len(s.model_ids()) < 5:  # TPE-like: learns, adds
            s.add_model(f"m{len(s.model_ids())}", epochs)
        dispatch()

    dispatch()
    while heap:
        clock, worker_id, unit = heapq.heappop(heap)
        if lock is None:
            finished(worker_id, unit, cost(unit))
            continue
        lock.arrived(worker_id, {"unit": unit})
        while (ready := lock.pop_ready()) is not None:
            w, u, result, duration = ready
            assert result["unit"] == u and duration == cost(u)
            finished(w, u, duration)
        # lockstep alone never leaves every worker idle while work is pending: when nothing
        # really runs, every held result has been released and the run is over
        assert heap or s.done, "all workers idle with work pending"
    assert s.done
    return trace


@pytest.mark.parametrize("add_on_done", [False, True])
def test_same_schedule_whatever_the_real_durations(add_on_done: bool) -> None:
    simulated = run(None, add_on_done=add_on_done)
    for noise_seed in range(8):
        assert run(noise_seed, add_on_done=add_on_done) == simulated


def test_without_lockstep_noise_changes_the_schedule() -> None:
    """The reason lockstep exists: fed real finish order, the scheduler's choices follow the noise."""
    traces = [run(noise_seed, lockstep=False) for noise_seed in range(4)]
    assert any(t != traces[0] for t in traces[1:])


def test_results_wait_for_their_virtual_turn() -> None:
    lock = Lockstep(lambda u: 1.0 if u.model_id == "a" else 2.0)
    a, b = Unit("a", 0, "train", 0, 0), Unit("b", 0, "train", 1, 0)
    lock.dispatched("w0", a)
    lock.dispatched("w1", b)
    lock.arrived("w1", "b done")  # b really finished first, but virtually finishes at 2
    assert lock.pop_ready() is None and lock.waiting == ["w1"] and lock.held == 1
    lock.arrived("w0", "a done")
    assert lock.pop_ready() == ("w0", a, "a done", 1.0) and lock.now == 1.0
    assert lock.pop_ready() == ("w1", b, "b done", 2.0) and lock.now == 2.0
    assert lock.pop_ready() is None


def test_ties_go_to_the_lower_partition() -> None:
    lock = Lockstep(lambda u: 1.0)
    units = [Unit("a", 0, "train", 1, 0), Unit("b", 0, "train", 0, 0)]
    lock.dispatched("w1", units[0])
    lock.dispatched("w0", units[1])
    lock.arrived("w1", 1)
    assert lock.pop_ready() is None  # w0 (partition 0) finishes at the same virtual time: it goes first
    lock.arrived("w0", 0)
    assert [lock.pop_ready()[0], lock.pop_ready()[0]] == ["w0", "w1"]


def test_forget_unblocks_the_others_and_bad_calls_raise() -> None:
    lock = Lockstep(lambda u: 1.0 if u.partition == 0 else 5.0)
    a, b = Unit("a", 0, "train", 0, 0), Unit("b", 0, "train", 1, 0)
    lock.dispatched("w0", a)
    lock.dispatched("w1", b)
    lock.arrived("w1", "b")
    assert lock.forget("w0") == a and lock.forget("w0") is None  # w0 lost: b need not wait for it
    assert lock.pop_ready() == ("w1", b, "b", 5.0)
    with pytest.raises(ValueError, match="runs nothing"):
        lock.arrived("w1", "again")
    lock.dispatched("w1", b)
    with pytest.raises(ValueError, match="already runs"):
        lock.dispatched("w1", a)
    with pytest.raises(ValueError, match="must be > 0"):
        Lockstep(lambda u: 0.0).dispatched("w0", a)


def test_next_finish_heap_matches_a_scan_of_all_workers() -> None:
    """The heap gives what the former min over every worker in flight gave: virtual finish, then
    partition, then dispatch order; through forgets, re-dispatches and many exact ties."""
    rng = random.Random(3)
    lock = Lockstep(lambda u: float(u.step))  # integer costs: exact ties are common
    flight: dict[str, tuple[float, int, int]] = {}  # reference: worker -> (finish, partition, seq)
    seq = 0
    for _ in range(3000):
        r = rng.random()
        idle = [w for w in (f"w{i}" for i in range(12)) if w not in flight]
        if r < 0.45 and idle:
            w = rng.choice(idle)
            # two workers may share a partition (a superseded one not yet forgotten)
            unit = Unit("m", 0, "train", rng.randrange(6), rng.randrange(1, 4))
            lock.dispatched(w, unit)
            flight[w] = (lock.now + unit.step, unit.partition, seq)
            seq += 1
        elif r < 0.5 and flight:
            w = rng.choice(sorted(flight))
            lock.forget(w)
            del flight[w]
        elif flight:
            w = rng.choice(sorted(w for w in flight if w not in lock.waiting) or sorted(flight))
            if w not in lock.waiting:
                lock.arrived(w, w)
            while (ready := lock.pop_ready()) is not None:
                expected = min(flight, key=lambda x: flight[x])
                assert ready[0] == expected
                del flight[expected]
