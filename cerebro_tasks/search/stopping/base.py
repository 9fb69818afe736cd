"""The interface every stopping rule implements, and what they share (direction, quantiles)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def at_least(name: str, value: int, low: int) -> int:
    """`value` when it is at least `low`; else an error naming the setting (``early_stopping.<name>``)."""
    if value < low:
        raise ValueError(f"early_stopping.{name}: expected an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Decision:
    """What a rule says about one model after one epoch: go on, or stop and why."""

    stop: bool
    reason: str = ""
    # other models this result pushed out, (model_id, reason): a rule may revise a model it let pass
    others: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"stop": self.stop, "reason": self.reason, "others": [list(o) for o in self.others]}


CONTINUE = Decision(False)


class StoppingRule:
    """Sees each model's validation value per epoch; says continue or stop (see the package docstring).

    ``mode`` is the metric's direction ("min" or "max"), ``max_epochs`` the epochs a model trains
    when never stopped. Subclasses set ``ARGS`` (their JSON arguments) and implement ``_decide``,
    which sees the value as a *loss* (lower is better) whatever the mode. No decision is taken at
    a model's last epoch (there is nothing left to save), but the value is still recorded.
    """

    ARGS: tuple[str, ...] = ()
    kind = ""

    def __init__(self, *, mode: str, max_epochs: int) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise ValueError(f"max_epochs must be an integer >= 1, got {max_epochs!r}")
        self.mode = mode
        self.max_epochs = max_epochs

    def on_result(self, model_id: str, epoch: int, value: float) -> Decision:
        """Model ``model_id`` validated its 0-based ``epoch`` with ``value`` of the metric."""
        loss = float(value) if self.mode == "min" else -float(value)
        last = epoch + 1 >= self.max_epochs
        if math.isnan(loss) and not last:
            self._record(model_id, epoch, math.inf)
            return Decision(True, f"epoch {epoch + 1}: the metric is not a number (diverged)")
        decision = self._decide(model_id, epoch, loss)
        return Decision(False, "", decision.others) if last else decision

    def _decide(self, model_id: str, epoch: int, loss: float) -> Decision:
        raise NotImplementedError

    def _record(self, model_id: str, epoch: int, loss: float) -> None:
        """Keep a value without deciding (a diverged model still counts at its rung)."""
        self._decide(model_id, epoch, loss)

    def decision_epochs(self) -> tuple[int, ...]:
        """Trained-epoch counts after which this rule may stop a model: training of the next epoch
        waits there for the validation (``HopScheduler.add_model(gates=...)``), so a stop comes
        before more is spent on the model. Default: every epoch but the last."""
        return tuple(range(1, self.max_epochs))

    def args(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.ARGS}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _shown(self, loss: float) -> str:
        """A loss back in the metric's own sign, for reasons people read."""
        return f"{loss if self.mode == 'min' else -loss:.4g}"


def to_json_number(loss: float) -> float | None:
    """A loss as strict JSON holds it: a diverged model's infinite loss as null."""
    return loss if math.isfinite(loss) else None


def from_json_number(value: float | None) -> float:
    return math.inf if value is None else float(value)


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default), of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    if xs[lo] == xs[hi]:  # also keeps inf - inf from making NaN
        return xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
