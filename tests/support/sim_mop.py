"""The MOP driver with its Spark workers replaced by a virtual clock, for search tests in milliseconds.

:class:`SimulatedMop` is :class:`cerebro_tasks.mop.runtime.MopDriver` itself (the real hop
scheduler, journal, resume, per-epoch and per-model callbacks, ``stop``) with one part swapped: the
barrier stage. Each dispatched unit "runs" for its model's cost on a virtual clock and reports the
metrics ``metric(params, epoch, kind)`` says, as a worker would; results reach the scheduler in
virtual finish order, which is what the lockstep schedule guarantees on real workers. What it
cannot show (Keras, Spark, real timing) the end-to-end test on local Spark does.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable

from cerebro_tasks.mop.runtime import MopDriver, MopResult
from cerebro_tasks.mop.scheduler import Unit
from cerebro_tasks.storage.layout import state_name

Metric = Callable[[dict[str, Any], int, str], float]


class DriverKilled(RuntimeError):
    """Raised by the simulation to stand for a driver that dies mid-run (the journal stays)."""


class SimulatedMop(MopDriver):
    """See the module docstring. ``fail(params, unit)`` makes a unit fail (every retry); ``kill_after``
    kills the driver after that many units finished in this attempt."""

    def __init__(self, run_url: str, *, num_workers: int, metric: Metric, seed: int = 0,
                 fail: Callable[[dict[str, Any], Unit], bool] | None = None, kill_after: int | None = None) -> None:
        super().__init__(spark=None, workload=None, run_url=run_url, num_workers=num_workers, seed=seed)
        self.metric = metric
        self.fail = fail or (lambda params, unit: False)
        self.kill_after = kill_after
        self.in_flight_low: list[int] = []  # models in flight whenever a model ended (ASHA keeps >= W)
        self.errors: dict[str, str] = {}

    def _run(self, on_model_done: Any) -> MopResult:
        self._notify_already_complete(on_model_done)
        for p in range(self.num_workers):
            self.scheduler.worker_joined(f"p{p}.1", p)
        heap: list[tuple[float, int, str, Unit, float]] = []
        clock = 0.0
        attempts = itertools.count()

        def dispatch() -> None:
            for worker_id, unit in self.scheduler.assign():
                cost = self._unit_cost(unit)
                self._attempts[worker_id] = f"sim{next(attempts)}"  # as the real dispatch does
                heapq.heappush(heap, (clock + cost, unit.partition, worker_id, unit, clock))

        dispatch()
        while heap:
            clock, _, worker_id, unit, start = heapq.heappop(heap)
            params = self.specs[unit.model_id].params
            attempt = self._attempts[worker_id]
            if self.fail(params, unit):  # as a worker's failure reaches the driver
                error = f"Traceback (most recent call last):\n  ...\nFloatingPointError: {unit}"
                self.errors[unit.model_id] = error
                self._unit_failed(worker_id, unit, error, on_model_done)
            else:
                value = float(self.metric(params, unit.epoch, unit.kind))
                result = {"start": start, "end": clock, "compute_s": clock - start, "load_s": 0.0, "save_s": 0.0,
                          "metrics": {"loss": value}, "num_samples": 10, "attempt": attempt}
                if unit.kind == "train":  # the state file a worker writes (empty: nothing reads it here)
                    self.store.write_bytes(b"", *state_name(unit.model_id, unit.step + 1, attempt))
                self._unit_done(worker_id, unit, result, clock - start, on_model_done)
                if self.kill_after is not None and self._units_run >= self.kill_after:
                    raise DriverKilled(f"driver killed after {self._units_run} units")
            dispatch()
        assert self.scheduler.done, self.scheduler.progress()
        return self._result()

    def _model_complete(self, model_id: str, history: dict[str, list[float]], on_model_done: Any) -> None:
        first = model_id not in self._completed_models
        super()._model_complete(model_id, history, on_model_done)
        if first:  # after the search topped the models in flight up
            live = [m for m in self.specs if self.scheduler.model_status(m).state not in ("done", "stopped", "failed")]
            self.in_flight_low.append(len(live))
