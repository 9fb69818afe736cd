"""Asynchronous successive halving (ASHA; Li et al., MLSys 2020), in its stopping form.

Rungs are at ``min_epochs * reduction_factor**k`` trained epochs (k = 0, 1, ...), below the
search's ``max_epochs``. When a model reaches a rung, its value is compared with the values
recorded at that rung by the models that reached it before: it goes on when it is within the best
``1 / reduction_factor`` of them (at or better than their ``1 - 1/reduction_factor`` quantile),
otherwise it stops there. The first model at a rung always goes on: decisions are taken as each
model arrives, never waiting for the others, which is what MOP needs (a model's epoch ends when
its W sub-epochs and its validation are done, independently of other models). This is Ray Tune's
ASHA rule; with ``reduction_factor`` eta about ``1/eta`` of the models pass each rung.
"""

from __future__ import annotations

from typing import Any

from cerebro_tasks.search.stopping.base import CONTINUE, Decision, StoppingRule, quantile


def rungs(min_epochs: int, reduction_factor: int, max_epochs: int, offset: int = 0) -> list[int]:
    """Trained-epoch counts at which models are judged: ``min_epochs * eta**(offset + k)`` < max_epochs."""
    out, t = [], min_epochs * reduction_factor ** offset
    while t < max_epochs:
        out.append(t)
        t *= reduction_factor
    return out


class ASHA(StoppingRule):
    """Asynchronous successive halving; see the module docstring."""

    ARGS = ("reduction_factor", "min_epochs")
    kind = "asha"

    def __init__(self, *, mode: str, max_epochs: int, reduction_factor: int = 3, min_epochs: int = 1,
                 _offset: int = 0) -> None:
        super().__init__(mode=mode, max_epochs=max_epochs)
        if reduction_factor < 2:
            raise ValueError(f"early_stopping.reduction_factor: expected an integer >= 2, got {reduction_factor!r}")
        if min_epochs < 1:
            raise ValueError(f"early_stopping.min_epochs: expected an integer >= 1, got {min_epochs!r}")
        self.reduction_factor = reduction_factor
        self.min_epochs = min_epochs
        self.rungs = rungs(min_epochs, reduction_factor, max_epochs, _offset)
        self._recorded: dict[int, list[tuple[str, float]]] = {t: [] for t in self.rungs}

    def _decide(self, model_id: str, epoch: int, loss: float) -> Decision:
        t = epoch + 1
        if t not in self._recorded:
            return CONTINUE
        before = [v for _, v in self._recorded[t]]
        self._recorded[t].append((model_id, loss))
        if not before:
            return CONTINUE
        cutoff = quantile(before, 1.0 / self.reduction_factor)
        if loss <= cutoff:
            return CONTINUE
        return Decision(True, f"ASHA rung {t} epochs: {self._shown(loss)} is outside the best 1/{self.reduction_factor} "
                              f"of the {len(before)} models before it (cutoff {self._shown(cutoff)})")

    def state_dict(self) -> dict[str, Any]:
        return {"rungs": {str(t): [[m, v] for m, v in rec] for t, rec in self._recorded.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {int(t): [(m, float(v)) for m, v in rec] for t, rec in state["rungs"].items()}
        if set(saved) != set(self._recorded):
            raise ValueError(f"saved ASHA state has rungs {sorted(saved)}, this rule has {sorted(self._recorded)}")
        self._recorded = saved
