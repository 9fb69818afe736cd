"""Search spaces: Cerebro's `hp_*` helpers, their JSON form, grid expansion and seeded sampling.

One JSON form serves Airflow Params, config files and the Python API:

    {"learning_rate": [1e-3, 1e-4],                       # a list is hp_choice
     "l2": {"loguniform": [-4, -2]},                      # 10 ** U(-4, -2), as in Cerebro
     "amp_factor": {"choice": [1, 2]},
     "window_minutes": {"quniform": [3, 9, 1]}}

`hp_loguniform(low, high)` takes base-10 exponents everywhere (Cerebro's random search did, its
TPE did not). Every draw of a search comes from one seeded generator, so two identical
dimensions do not draw identical values.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Dimension:
    kind: str  # choice | uniform | quniform | loguniform | qloguniform
    args: tuple[Any, ...]

    def to_json(self) -> Any:
        return list(self.args[0]) if self.kind == "choice" else {self.kind: list(self.args)}

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            options = self.args[0]
            return options[int(rng.integers(len(options)))]
        if self.kind == "uniform":
            return float(rng.uniform(*self.args))
        if self.kind == "quniform":
            low, high, q = self.args
            return _quantise(float(rng.uniform(low, high)), q)
        if self.kind == "loguniform":
            return float(10.0 ** rng.uniform(*self.args))
        if self.kind == "qloguniform":
            low, high, q = self.args
            return _quantise(float(10.0 ** rng.uniform(low, high)), q)
        raise ValueError(f"unknown dimension kind {self.kind!r}")


def _quantise(value: float, q: float) -> float | int:
    v = round(value / q) * q
    return int(v) if float(q).is_integer() else v


def hp_choice(options: Sequence[Any]) -> Dimension:
    if not options:
        raise ValueError("hp_choice needs at least one option")
    return Dimension("choice", (tuple(options),))


def hp_uniform(low: float, high: float) -> Dimension:
    return Dimension("uniform", _ordered(low, high))


def hp_quniform(low: float, high: float, q: float) -> Dimension:
    return Dimension("quniform", (*_ordered(low, high), _positive(q)))


def hp_loguniform(low: float, high: float) -> Dimension:
    """10 ** U(low, high): `low` and `high` are base-10 exponents, as in Cerebro."""
    return Dimension("loguniform", _ordered(low, high))


def hp_qloguniform(low: float, high: float, q: float) -> Dimension:
    return Dimension("qloguniform", (*_ordered(low, high), _positive(q)))


def _ordered(low: float, high: float) -> tuple[float, float]:
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"expected finite low <= high, got low={low!r}, high={high!r}")
    return (float(low), float(high))


def _positive(q: float) -> float:
    if not q > 0:
        raise ValueError(f"q must be > 0, got {q!r}")
    return q


_BUILDERS = {"choice": lambda a: hp_choice(a), "uniform": lambda a: hp_uniform(*a),
             "quniform": lambda a: hp_quniform(*a), "loguniform": lambda a: hp_loguniform(*a),
             "qloguniform": lambda a: hp_qloguniform(*a)}


def parse_space(space: dict[str, Any]) -> dict[str, Dimension]:
    """The JSON form (or `hp_*` objects) as Dimensions; errors name the parameter."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"search space must be a non-empty object of parameter -> values, got {space!r}")
    out: dict[str, Dimension] = {}
    for name, spec in space.items():
        try:
            if isinstance(spec, Dimension):
                out[name] = spec
            elif isinstance(spec, (list, tuple)):
                out[name] = hp_choice(spec)
            elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in _BUILDERS:
                kind, args = next(iter(spec.items()))
                out[name] = _BUILDERS[kind](args)
            else:
                out[name] = hp_choice([spec])  # a fixed value
        except (TypeError, ValueError) as e:
            raise ValueError(f"search space parameter {name!r}: {e} (got {spec!r}; expected a list of choices "
                             f"or one of {sorted(_BUILDERS)} with its arguments)") from None
    return out


def space_to_json(space: dict[str, Dimension]) -> dict[str, Any]:
    return {k: d.to_json() for k, d in space.items()}


def grid(space: dict[str, Dimension]) -> list[dict[str, Any]]:
    """Every combination of the choices, in a stable order (first parameter slowest)."""
    for name, d in space.items():
        if d.kind != "choice":
            raise ValueError(f"grid search needs a list of choices for every parameter; {name!r} is {d.kind}")
    names = list(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n].args[0] for n in names))]


def sample(space: dict[str, Dimension], n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """`n` configurations drawn from one generator (parameters in a fixed order)."""
    return [{name: d.sample(rng) for name, d in space.items()} for _ in range(n)]
