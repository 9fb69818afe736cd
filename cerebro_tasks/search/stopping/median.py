"""The median stopping rule (Golovin et al., "Google Vizier", KDD 2017), as Ray Tune and Optuna apply it.

After ``t >= min_epochs`` epochs a model stops when its best value so far is worse than the median,
over the other models that have reached ``t`` epochs, of their running mean of the first ``t``
values, provided at least ``min_samples`` such models exist. Vizier compares with *completed*
trials; under MOP every model trains at once and few complete before the others reach the same
epoch, so (as Optuna's MedianPruner does) every model that reached ``t`` epochs counts.
"""

from __future__ import annotations

import statistics
from typing import Any

from cerebro_tasks.search.stopping.base import (CONTINUE, Decision, StoppingRule, at_least, from_json_number,
                                                to_json_number)


class MedianStopping(StoppingRule):
    """See the module docstring."""

    ARGS = ("min_epochs", "min_samples")
    kind = "median"

    def __init__(self, *, mode: str, max_epochs: int, min_epochs: int = 1, min_samples: int = 3) -> None:
        super().__init__(mode=mode, max_epochs=max_epochs)
        self.min_epochs = at_least("min_epochs", min_epochs, 1)
        self.min_samples = at_least("min_samples", min_samples, 1)
        self._losses: dict[str, list[float]] = {}

    def _decide(self, model_id: str, epoch: int, loss: float) -> Decision:
        mine = self._losses.setdefault(model_id, [])
        if len(mine) != epoch:
            raise ValueError(f"median stopping: model {model_id} reported epoch {epoch} after {len(mine)} epochs")
        mine.append(loss)
        t = epoch + 1
        if t < self.min_epochs:
            return CONTINUE
        means = [sum(v[:t]) / t for m, v in self._losses.items() if m != model_id and len(v) >= t]
        if len(means) < self.min_samples:
            return CONTINUE
        median = statistics.median(means)
        best = min(mine)
        if best <= median:
            return CONTINUE
        return Decision(True, f"median rule at {t} epochs: best so far {self._shown(best)} is worse than the median "
                              f"{self._shown(median)} of {len(means)} models' running means")

    def decision_epochs(self) -> tuple[int, ...]:
        return tuple(range(self.min_epochs, self.max_epochs))

    def state_dict(self) -> dict[str, Any]:
        return {"losses": {m: [to_json_number(x) for x in v] for m, v in self._losses.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses = {m: [from_json_number(x) for x in v] for m, v in state["losses"].items()}
