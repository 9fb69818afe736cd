"""Hyperband (Li et al., JMLR 2018) as brackets of ASHA, the asynchronous form of Ray Tune and the ASHA paper.

Bracket ``b`` (0 .. s_max, where ``min_epochs * eta**s_max <= max_epochs``) is an ASHA whose first
rung is at ``min_epochs * eta**b`` epochs: bracket 0 stops the most aggressively, the last one
trains its models to the end. Models are dealt to brackets in the order they first report,
by a smooth weighted round robin with Hyperband's bracket sizes ``ceil((s_max+1)/(s+1) * eta**s)``
(s = s_max - b), so the deal is deterministic and the brackets fill in Hyperband's proportions
whatever the number of models. A model is judged only against the models of its own bracket.
"""

from __future__ import annotations

import math
from typing import Any

from cerebro_tasks.search.stopping.asha import ASHA
from cerebro_tasks.search.stopping.base import Decision, StoppingRule


class Hyperband(StoppingRule):
    """Brackets of ASHA; see the module docstring."""

    ARGS = ("reduction_factor", "min_epochs")
    kind = "hyperband"

    def __init__(self, *, mode: str, max_epochs: int, reduction_factor: int = 3, min_epochs: int = 1) -> None:
        super().__init__(mode=mode, max_epochs=max_epochs)
        first = ASHA(mode=mode, max_epochs=max_epochs, reduction_factor=reduction_factor, min_epochs=min_epochs)
        self.reduction_factor = reduction_factor
        self.min_epochs = min_epochs
        s_max = 0
        while min_epochs * reduction_factor ** (s_max + 1) <= max_epochs:
            s_max += 1
        self.brackets = [first] + [ASHA(mode=mode, max_epochs=max_epochs, reduction_factor=reduction_factor,
                                        min_epochs=min_epochs, _offset=b) for b in range(1, s_max + 1)]
        self.weights = [math.ceil((s_max + 1) / (s_max - b + 1) * reduction_factor ** (s_max - b))
                        for b in range(s_max + 1)]
        self.bracket_of: dict[str, int] = {}

    def decision_epochs(self) -> tuple[int, ...]:
        return tuple(sorted({t for a in self.brackets for t in a.rungs}))

    def _bracket(self, model_id: str) -> int:
        if model_id not in self.bracket_of:
            counts = [0] * len(self.brackets)
            for b in self.bracket_of.values():
                counts[b] += 1
            # the bracket furthest below its share; ties: the more aggressive one
            self.bracket_of[model_id] = min(range(len(self.brackets)), key=lambda b: ((counts[b] + 1) / self.weights[b], b))
        return self.bracket_of[model_id]

    def _decide(self, model_id: str, epoch: int, loss: float) -> Decision:
        b = self._bracket(model_id)
        d = self.brackets[b]._decide(model_id, epoch, loss)
        head = f"Hyperband bracket {b}, "
        return Decision(d.stop, head + d.reason if d.stop else "", tuple((m, head + r) for m, r in d.others))

    def state_dict(self) -> dict[str, Any]:
        return {"bracket_of": dict(self.bracket_of), "brackets": [a.state_dict() for a in self.brackets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["brackets"]) != len(self.brackets):
            raise ValueError(f"saved Hyperband state has {len(state['brackets'])} brackets, this rule has "
                             f"{len(self.brackets)}")
        self.bracket_of = {m: int(b) for m, b in state["bracket_of"].items()}
        for a, s in zip(self.brackets, state["brackets"]):
            a.load_state_dict(s)
