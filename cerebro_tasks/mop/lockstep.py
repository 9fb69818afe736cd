"""Lockstep: the same seed gives the same schedule, however long units really take.

`HopScheduler` is deterministic in the events it is told, but with real workers the order of
``unit_finished`` events follows real durations, which are noisy (other processes, garbage
collection, I/O). Two runs with the same seed could then send a model to its partitions in another
order, and SGD order changes the weights: same seed, different search result.

`Lockstep` puts a virtual clock between the workers and the scheduler. Every dispatched unit gets
a virtual duration from a deterministic cost estimate; finished units are handed to the scheduler
in virtual finish order (ties by partition), each with its virtual duration, and the driver calls
``assign()`` after each one. A result that really arrives early is held until every unit that
virtually finishes before it has really finished. The scheduler therefore sees exactly the event
sequence of a simulation with the estimated durations: same seed, same schedule, same weights.

The price is waiting: a worker whose unit really finished early may sit idle until the units
that virtually finish before it are in. With balanced partitions and costs that track reality
(`ModelSpec.cost`) this is small; ``bench/mop_local.py`` measures lockstep against the
adaptive schedule (real durations, no waiting).

Failures (a worker lost, a unit failed) are not timed: the driver reports them at once, the run
stays correct (MOP's contract holds), but the schedule from then on may differ from a run
without the failure. Standard library only, like the scheduler.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable

from cerebro_tasks.mop.scheduler import Unit

__all__ = ["Lockstep"]


class Lockstep:
    """Releases real unit results in virtual-time order; see the module docstring.

    Driver loop (``cost(unit)`` > 0 is the unit's virtual duration)::

        lock = Lockstep(cost)
        for worker_id, unit in scheduler.assign(): dispatch(...); lock.dispatched(worker_id, unit)
        on a result:  lock.arrived(worker_id, result)
                      while (ready := lock.pop_ready()) is not None:
                          worker_id, unit, result, duration = ready
                          scheduler.unit_finished(worker_id, unit, duration)
                          for w, u in scheduler.assign(): dispatch(...); lock.dispatched(w, u)
        on a failure: lock.forget(worker_id), tell the scheduler, then release as above: the
                      forgotten unit may be the one the held results were waiting for, and
                      nothing else would release them (every worker could sit idle for good)
    """

    def __init__(self, cost: Callable[[Unit], float]) -> None:
        self._cost = cost
        self.now = 0.0  # virtual time of the last released event
        # worker -> (virtual finish, partition, unit, virtual duration) of its unit in flight
        self._flight: dict[str, tuple[float, int, Unit, float]] = {}
        self._arrived: dict[str, Any] = {}  # worker -> its real result, not yet released
        self.held = 0  # results that arrived before their virtual turn and had to wait
        # (virtual finish, partition, dispatch seq, worker) of every unit in flight, so the next
        # one is found in O(log W), not by a pass over all workers on every event. The seq keeps
        # the old tie order of exact ties (dispatch order); entries of forgotten units are
        # skipped when they surface (_seq no longer names them).
        self._heap: list[tuple[float, int, int, str]] = []
        self._seq: dict[str, int] = {}  # worker -> seq of its unit in flight
        self._next_seq = 0

    def dispatched(self, worker_id: str, unit: Unit) -> None:
        """``unit`` was sent to ``worker_id`` at the current virtual time."""
        if worker_id in self._flight:
            raise ValueError(f"worker {worker_id!r} already runs {self._flight[worker_id][2]}")
        duration = float(self._cost(unit))
        if not duration > 0:
            raise ValueError(f"cost of {unit} must be > 0, got {duration}")
        finish = self.now + duration
        self._flight[worker_id] = (finish, unit.partition, unit, duration)
        self._seq[worker_id] = seq = self._next_seq
        self._next_seq += 1
        heapq.heappush(self._heap, (finish, unit.partition, seq, worker_id))
        if len(self._heap) > 2 * len(self._seq) + 16:  # many forgotten: drop their entries
            self._heap = [e for e in self._heap if self._seq.get(e[3]) == e[2]]
            heapq.heapify(self._heap)

    def arrived(self, worker_id: str, result: Any) -> None:
        """The real result of ``worker_id``'s unit is in; it waits for its virtual turn."""
        if worker_id not in self._flight:
            raise ValueError(f"result from worker {worker_id!r}, which runs nothing")
        self._arrived[worker_id] = result
        if self._next() != worker_id:
            self.held += 1

    def pop_ready(self) -> tuple[str, Unit, Any, float] | None:
        """The next unit in virtual finish order if its result is in: (worker, unit, result, duration)."""
        worker_id = self._next()
        if worker_id is None or worker_id not in self._arrived:
            return None
        finish, _, unit, duration = self._flight.pop(worker_id)
        del self._seq[worker_id]
        heapq.heappop(self._heap)  # its entry is the head (_next)
        self.now = finish
        return worker_id, unit, self._arrived.pop(worker_id), duration

    def forget(self, worker_id: str) -> Unit | None:
        """``worker_id`` failed or left: drop its unit in flight (and any result held for it)."""
        self._arrived.pop(worker_id, None)
        self._seq.pop(worker_id, None)  # its heap entry goes when it surfaces
        flight = self._flight.pop(worker_id, None)
        return flight[2] if flight else None

    @property
    def waiting(self) -> list[str]:
        """Workers whose result is in but held for an earlier unit (for the idle explanation)."""
        return sorted(self._arrived)

    def _next(self) -> str | None:
        """The worker whose unit finishes first in virtual time (ties: partition, then dispatch
        order), or None; drops the heap entries of forgotten units on the way."""
        heap, seq = self._heap, self._seq
        while heap:
            _, _, s, w = heap[0]
            if seq.get(w) == s:
                return w
            heapq.heappop(heap)
        return None
