"""Incremental indexes behind `HopScheduler.assign()` (mop/scheduler.py); standard library only.

The scheduler's policy asks, for an idle partition ``p``: which waiting model with the longest
remaining chain still needs ``p``, and which pending val unit of ``p`` has the oldest epoch. Walking
every model answers that in O(M) per call, too slow for a driver with thousands of models
(bench/scheduler_sim.py --scale). A model's candidacy and chain change only on its own events (or
add/stop), so these indexes are updated there and queried in about O(log M) per placed unit:

* `TrainIndex`: the models that may start a train unit now ("waiting"), in chain order, in two
  lazy-deletion heaps (timed models by their chain; untimed ones by their remaining unit count,
  scaled by the run's mean unit time when read), plus per partition how many waiting models still
  need it this epoch (work conservation, the demand-aware partition choice, ``idle_reason``).
* `ValIndex`: per partition, a lazy-deletion heap of pending val units by (epoch, tie) and an
  exact count of them.
* `ExactSum`: a float sum that stays exact under add/remove, so the run's remaining work is a
  function of the current state alone (a restored scheduler recomputes the very same number).

Nothing here is serialised: `HopScheduler.from_state_dict` rebuilds the indexes from the models.
"""

from __future__ import annotations

import heapq
from typing import Callable, Iterable

__all__ = ["ExactSum", "TrainIndex", "ValIndex"]

# Every finite float is an integer multiple of 2**-1074 (the smallest subnormal).
_SHIFT = 1074
_ONE = 1 << _SHIFT


def _fixed(x: float) -> int:
    """x as an exact integer count of 2**-1074 (x finite)."""
    n, d = x.as_integer_ratio()  # d is a power of two <= 2**1074
    return n << (_SHIFT + 1 - d.bit_length())


class ExactSum:
    """Sum of floats without rounding error: adding then removing x leaves it unchanged, so its
    value depends on which terms it holds, never on the order they came and went in."""

    __slots__ = ("_n",)

    def __init__(self) -> None:
        self._n = 0

    def add(self, x: float) -> None:
        if x:
            self._n += _fixed(x)

    def sub(self, x: float) -> None:
        if x:
            self._n -= _fixed(x)

    @property
    def value(self) -> float:
        return self._n / _ONE  # int / int is correctly rounded


# A TrainIndex entry: (-key, tie, order, model_id). key is the chain (timed heap) or the remaining
# train unit count (untimed heap); tie is the model's seeded random tie key, order its add order.
# Keys are unique per model, so the order valid entries come out in depends only on the set of
# valid entries, not on the history of pushes: a rebuilt index behaves identically.
Entry = tuple[float, float, int, str]


class TrainIndex:
    """Waiting models (may start a train unit now) in chain order; see the module docstring.

    An entry is valid while it is the model's current one (``self._entry[model_id] is entry``);
    superseded ones stay in the heaps until they surface or a compaction drops them.
    """

    TIMED, UNTIMED = 0, 1

    def __init__(self, num_partitions: int) -> None:
        self._heaps: tuple[list[Entry], list[Entry]] = ([], [])
        self._entry: dict[str, tuple[int, Entry]] = {}  # model -> (heap, current entry)
        # Per partition: how many counted models have already visited it this epoch. Counted
        # models are exactly the waiting ones (the scheduler keeps both in step).
        self._visited = [0] * num_partitions
        self._counted = 0
        self.hold_compaction = False  # set during a scan: popped entries are outside the heaps

    # -- need counts -------------------------------------------------------------
    def count_in(self, visited: Iterable[int]) -> None:
        """A model starts waiting, having visited ``visited`` this epoch."""
        self._counted += 1
        vc = self._visited
        for q in visited:
            vc[q] += 1

    def count_out(self, visited: Iterable[int]) -> None:
        """A counted model stops waiting (``visited``: what it was counted with)."""
        self._counted -= 1
        vc = self._visited
        for q in visited:
            vc[q] -= 1

    def count_visit(self, p: int) -> None:
        """A counted model visited ``p`` without leaving the index (journal replay)."""
        self._visited[p] += 1

    def need(self, p: int) -> int:
        """Waiting models that still need partition ``p`` this epoch."""
        return self._counted - self._visited[p]

    def any_need(self, partitions: Iterable[int]) -> bool:
        c, vc = self._counted, self._visited
        return any(c > vc[p] for p in partitions)

    @property
    def waiting(self) -> int:
        return self._counted

    # -- chain order ---------------------------------------------------------------
    def put(self, model_id: str, timed: bool, key: float, tie: float, order: int) -> None:
        """Make (key, tie, order) the model's current entry (a no-op when it already is)."""
        h = self.TIMED if timed else self.UNTIMED
        cur = self._entry.get(model_id)
        if cur is not None and cur[0] == h and cur[1][0] == -key:
            return
        entry = (-key, tie, order, model_id)
        self._entry[model_id] = (h, entry)
        heapq.heappush(self._heaps[h], entry)
        self._maybe_compact()

    def drop(self, model_id: str) -> None:
        self._entry.pop(model_id, None)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._entry

    def _head(self, h: int) -> Entry | None:
        heap, cur = self._heaps[h], self._entry
        while heap:
            e = heap[0]
            c = cur.get(e[3])
            if c is not None and c[1] is e:
                return e
            heapq.heappop(heap)  # superseded or dropped
        return None

    def best(self, scale: float, extra: float) -> tuple[float, int, Entry] | None:
        """The waiting model with the longest chain: (chain, heap, entry), not removed.

        Untimed models' chains are ``scale * (count + extra)`` (the run's mean unit time times
        their remaining units plus a val unit), the same order as their counts, so only the
        comparison with the timed heap's head needs ``scale``. Ties: tie key, then add order.
        """
        t, u = self._head(self.TIMED), self._head(self.UNTIMED)
        if u is None:
            return None if t is None else (-t[0], self.TIMED, t)
        cu = scale * (-u[0] + extra)
        if t is None or (t[0], t[1], t[2]) > (-cu, u[1], u[2]):
            return cu, self.UNTIMED, u
        return -t[0], self.TIMED, t

    def pop(self, h: int) -> Entry:
        """Remove the head of heap ``h`` (the entry `best` just returned) for a scan."""
        return heapq.heappop(self._heaps[h])

    def push_back(self, h: int, entry: Entry) -> None:
        """Return an entry popped during a scan (the model was not placed)."""
        heapq.heappush(self._heaps[h], entry)

    def _maybe_compact(self) -> None:
        # Each event of a model supersedes its entry; drop the dead ones once they dominate, so
        # memory stays O(waiting models) and pops stay O(log M) (amortised O(1) per push).
        if self.hold_compaction:
            return
        if len(self._heaps[0]) + len(self._heaps[1]) > 2 * len(self._entry) + 64:
            live: tuple[list[Entry], list[Entry]] = ([], [])
            for h, e in self._entry.values():
                live[h].append(e)
            for h in (self.TIMED, self.UNTIMED):
                heapq.heapify(live[h])
                self._heaps[h][:] = live[h]


# A ValIndex entry: (epoch, tie, order, model_id) on one partition's heap.
ValEntry = tuple[int, float, int, str]


class ValIndex:
    """Pending val units per partition, oldest epoch first; see the module docstring.

    ``pending(model_id, epoch, p)`` (the scheduler's state) says whether an entry still stands for
    a pending unit; the count per partition is kept exact by the scheduler's add/taken calls.
    """

    def __init__(self, num_partitions: int, pending: Callable[[str, int, int], bool]) -> None:
        self._heaps: list[list[ValEntry]] = [[] for _ in range(num_partitions)]
        self._count = [0] * num_partitions
        self._pending = pending

    def add(self, p: int, epoch: int, tie: float, order: int, model_id: str) -> None:
        """The val unit (model, epoch) of partition ``p`` became pending."""
        self._count[p] += 1
        heap = self._heaps[p]
        heapq.heappush(heap, (epoch, tie, order, model_id))
        if len(heap) > 2 * self._count[p] + 32:
            pend = self._pending
            # a unit requeued while its old entry was still there has two: keep one
            live = sorted({e for e in heap if pend(e[3], e[0], p)})
            heap[:] = live  # a sorted list is a heap

    def taken(self, p: int) -> None:
        """A pending val unit of ``p`` was dispatched or dropped (its entry goes lazily)."""
        self._count[p] -= 1

    def count(self, p: int) -> int:
        return self._count[p]

    def head(self, p: int) -> ValEntry | None:
        """The pending val unit of ``p`` with the oldest epoch (ties: tie key, add order)."""
        heap, pend = self._heaps[p], self._pending
        while heap:
            e = heap[0]
            if pend(e[3], e[0], p):
                return e
            heapq.heappop(heap)
        return None
