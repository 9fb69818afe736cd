"""Searchers: which configurations a search trains, behind one interface (grid, random, TPE).

In the shape of Optuna's samplers and Ray Tune's searchers: ``propose(n)`` returns up to ``n`` new
configurations (fewer once the search has none left), ``observe(params, value)`` reports a model's
result, ``observe_failure(params, error)`` a model that failed (TPE counts it as bad, never learns
from its partial metrics), and ``state_dict()`` / ``load_state_dict()`` carry what a resumed run
needs. The state is the list of configurations proposed so far, in order: it lives in the run's
``run.json`` (the MOP driver's models), so nothing else has to be written for a resume;
observations come back as the resumed driver replays each finished model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from cerebro_tasks.search.space import Dimension, grid, parse_space, sample

__all__ = ["Searcher", "GridSearcher", "RandomSearcher", "TPESearcher", "make_searcher", "SEARCH_KINDS"]

SEARCH_KINDS = ("grid", "random", "tpe")


class Searcher:
    """Proposes configurations and learns from results; see the module docstring."""

    kind = ""

    def __init__(self, space: Mapping[str, Any], *, seed: int, mode: str) -> None:
        self.space: dict[str, Dimension] = parse_space(dict(space))
        self.seed = int(seed)
        self.mode = mode
        self.proposed: list[dict[str, Any]] = []

    @property
    def total(self) -> int:
        """Configurations this search trains in all."""
        raise NotImplementedError

    @property
    def remaining(self) -> int:
        return self.total - len(self.proposed)

    def propose(self, n: int) -> list[dict[str, Any]]:
        out = self._propose(max(0, min(int(n), self.remaining)))
        self.proposed.extend(dict(p) for p in out)
        return out

    def _propose(self, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def observe(self, params: Mapping[str, Any], value: float) -> None:
        """A model of ``params`` reached ``value`` (its selection value; NaN: it has none)."""

    def observe_failure(self, params: Mapping[str, Any], error: str | None = None) -> None:
        """A model of ``params`` failed; whatever metrics it reported before do not count."""

    def state_dict(self) -> dict[str, Any]:
        return {"proposed": [dict(p) for p in self.proposed]}

    def load_state_dict(self, state: Mapping[str, Any], finished: set[int] | None = None) -> None:
        """Continue after the configurations of ``state`` (``finished``: indexes already trained)."""
        self.proposed = [dict(p) for p in state["proposed"]]


class _Fixed(Searcher):
    """Grid and random: every configuration is known from the start, proposed in a stable order."""

    configs: list[dict[str, Any]]

    @property
    def total(self) -> int:
        return len(self.configs)

    def _propose(self, n: int) -> list[dict[str, Any]]:
        start = len(self.proposed)
        return [dict(c) for c in self.configs[start:start + n]]


class GridSearcher(_Fixed):
    kind = "grid"

    def __init__(self, space: Mapping[str, Any], *, seed: int, mode: str) -> None:
        super().__init__(space, seed=seed, mode=mode)
        self.configs = grid(self.space)  # raises, naming the dimension, unless all are choices


class RandomSearcher(_Fixed):
    kind = "random"

    def __init__(self, space: Mapping[str, Any], *, seed: int, mode: str, num_models: int) -> None:
        super().__init__(space, seed=seed, mode=mode)
        if int(num_models) < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models!r}")
        # one generator for every draw: two identical dimensions do not draw identical values
        self.configs = sample(self.space, int(num_models), np.random.default_rng(self.seed))


class TPESearcher(Searcher):
    """hyperopt's TPE (:class:`cerebro_tasks.search.tpe.TPEProposer`) as a searcher.

    ``proposals`` lists (params, finished models TPE had seen when it proposed them): what each
    proposal learnt from.
    """

    kind = "tpe"

    def __init__(self, space: Mapping[str, Any], *, seed: int, mode: str, num_models: int,
                 n_startup_jobs: int = 10) -> None:
        from cerebro_tasks.search.tpe import TPEProposer

        super().__init__(space, seed=seed, mode=mode)
        if int(num_models) < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models!r}")
        self.num_models = int(num_models)
        self.proposer = TPEProposer(self.space, seed=self.seed, metric_mode=mode, n_startup_jobs=n_startup_jobs)
        self.proposals: list[tuple[dict[str, Any], int]] = []

    @property
    def total(self) -> int:
        return self.num_models

    def _propose(self, n: int) -> list[dict[str, Any]]:
        configs = self.proposer.propose(n)
        self.proposals.extend((c, self.proposer.num_observed) for c in configs)
        return configs

    def observe(self, params: Mapping[str, Any], value: float) -> None:
        self.proposer.observe(params, value)

    def observe_failure(self, params: Mapping[str, Any], error: str | None = None) -> None:
        self.proposer.observe(params, math.nan)  # hyperopt's STATUS_FAIL: bad, not learnt from

    def load_state_dict(self, state: Mapping[str, Any], finished: set[int] | None = None) -> None:
        super().load_state_dict(state)
        finished = finished or set()
        for i, params in enumerate(self.proposed):
            if i in finished:
                self.proposer.skip(1)  # its result comes back through observe()
            else:
                self.proposer.add_pending(params)  # still training: TPE steers away from it


def make_searcher(kind: str, space: Mapping[str, Any], *, seed: int, mode: str, num_models: int | None = None,
                  n_startup_jobs: int | None = None) -> Searcher:
    """The searcher of ``kind`` (one of :data:`SEARCH_KINDS`)."""
    if kind == "grid":
        return GridSearcher(space, seed=seed, mode=mode)
    if kind == "random":
        return RandomSearcher(space, seed=seed, mode=mode, num_models=int(num_models or 0))
    if kind == "tpe":
        n = int(num_models or 0)
        startup = n_startup_jobs if n_startup_jobs is not None else max(1, min(10, n // 2))
        return TPESearcher(space, seed=seed, mode=mode, num_models=n, n_startup_jobs=startup)
    raise ValueError(f"unknown search kind {kind!r}; choose one of {SEARCH_KINDS}")
