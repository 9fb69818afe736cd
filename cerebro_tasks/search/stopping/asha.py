"""Asynchronous successive halving (ASHA; Li et al., MLSys 2020), in its stopping form, made for MOP.

Rungs are at ``min_epochs * reduction_factor**k`` trained epochs (k = 0, 1, ...), below the
search's ``max_epochs``. When a model reaches a rung it is judged at once against every value
recorded at that rung so far, its own included: it goes on when it is within the best
``1 / reduction_factor`` of them (at or better than their ``1/reduction_factor`` quantile), otherwise
it stops there. Decisions never wait for other models: a model's epoch ends when its W sub-epochs
and its validation are done, independently of the others.

One difference from Ray Tune's ASHA, needed because MOP trains many models at once: there, the
first models to reach a rung always pass, and under MOP a whole grid reaches its first rung within
one round of epochs, in the order the hop scheduler happens to run them (longest chains first),
so nearly all of it would pass. Here a pass is provisional until the model reaches the next rung
(or its last epoch): a later arrival that pushes a provisional model out of the best
``1/reduction_factor`` at that rung stops it then (``Decision.others``). A model is never judged
twice at one rung by its own value, and once past the next rung its earlier rung no longer
counts. With ``reduction_factor`` eta about ``1/eta`` of the models pass each rung.
"""

from __future__ import annotations

from typing import Any

from cerebro_tasks.search.stopping.base import (CONTINUE, Decision, StoppingRule, at_least, from_json_number,
                                                quantile, to_json_number)


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
        self.reduction_factor = at_least("reduction_factor", reduction_factor, 2)
        self.min_epochs = at_least("min_epochs", min_epochs, 1)
        self.rungs = rungs(min_epochs, reduction_factor, max_epochs, _offset)
        self._recorded: dict[int, list[tuple[str, float]]] = {t: [] for t in self.rungs}
        self._provisional: dict[int, list[str]] = {t: [] for t in self.rungs}  # passed t, not yet past the next

    def _decide(self, model_id: str, epoch: int, loss: float) -> Decision:
        t = epoch + 1
        if t not in self._recorded:
            if t >= self.max_epochs:
                self._settle(model_id, below=t + 1)  # trained to the end: nothing left to stop
            return CONTINUE
        self._settle(model_id, below=t)  # past the rungs below t: they no longer count
        self._recorded[t].append((model_id, loss))
        cutoff = quantile([v for _, v in self._recorded[t]], 1.0 / self.reduction_factor)
        n = len(self._recorded[t])
        losses = dict(self._recorded[t])
        out = [m for m in self._provisional[t] if losses[m] > cutoff]
        self._provisional[t] = [m for m in self._provisional[t] if m not in out]
        others = tuple((m, self._why(t, losses[m], cutoff, n) + f", after {model_id} arrived") for m in out)
        if loss > cutoff:
            return Decision(True, self._why(t, loss, cutoff, n), others)
        self._provisional[t].append(model_id)
        return Decision(False, "", others)

    def decision_epochs(self) -> tuple[int, ...]:
        return tuple(self.rungs)

    def _why(self, t: int, loss: float, cutoff: float, n: int) -> str:
        return (f"ASHA rung {t} epochs: {self._shown(loss)} is outside the best 1/{self.reduction_factor} of the "
                f"{n} models there (cutoff {self._shown(cutoff)})")

    def _settle(self, model_id: str, below: int) -> None:
        """The model is past every rung below ``below``: its passes there are final."""
        for t, models in self._provisional.items():
            if t < below and model_id in models:
                models.remove(model_id)

    def state_dict(self) -> dict[str, Any]:
        return {"rungs": {str(t): [[m, to_json_number(v)] for m, v in rec] for t, rec in self._recorded.items()},
                "provisional": {str(t): list(ms) for t, ms in self._provisional.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {int(t): [(m, from_json_number(v)) for m, v in rec] for t, rec in state["rungs"].items()}
        if set(saved) != set(self._recorded):
            raise ValueError(f"saved ASHA state has rungs {sorted(saved)}, this rule has {sorted(self._recorded)}")
        self._recorded = saved
        self._provisional = {int(t): list(ms) for t, ms in state["provisional"].items()}
