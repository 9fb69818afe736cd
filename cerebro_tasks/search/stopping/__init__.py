"""Early stopping on MOP: rules that see each model's per-epoch validation result and say go on or stop.

The one interface (:class:`StoppingRule`, in the shape of Optuna's pruners and Ray Tune's
schedulers): the search driver calls ``on_result(model_id, epoch, value)`` once for every epoch a
model has validated, in the order the scheduler saw them, and stops the model when it returns a
:class:`Decision` with ``stop=True``. Rules are pure Python, deterministic in the sequence of
results they are given, and ``state_dict()`` / ``load_state_dict()`` round-trip everything, so a
resumed run continues with the same state and decides nothing twice.

The JSON form, used by the run configuration, the DAG Param, the CLI and the Cerebro API's
``early_stopping=`` keyword::

    {"kind": "asha", "reduction_factor": 3, "min_epochs": 1}
    {"kind": "hyperband", "reduction_factor": 3, "min_epochs": 1}
    {"kind": "median", "min_epochs": 1, "min_samples": 3}

``"successive_halving"`` is a synonym of ``"asha"`` (its asynchronous form, which MOP needs:
models reach a rung at different times).
"""

from __future__ import annotations

from typing import Any, Mapping

from cerebro_tasks.search.stopping.base import Decision, StoppingRule

__all__ = ["Decision", "StoppingRule", "KINDS", "make_stopping_rule", "check_early_stopping"]

KINDS = ("asha", "successive_halving", "hyperband", "median")


def check_early_stopping(spec: Mapping[str, Any] | None, max_epochs: int) -> dict[str, Any] | None:
    """The JSON form validated (building the rule once); errors name the field. None: no early stopping."""
    if spec is None:
        return None
    make_stopping_rule(spec, mode="min", max_epochs=max_epochs)
    return dict(spec)


def make_stopping_rule(spec: Mapping[str, Any], *, mode: str, max_epochs: int) -> StoppingRule:
    """The rule described by ``spec`` (see the module docstring) for a metric improving in ``mode``."""
    from cerebro_tasks.search.stopping.asha import ASHA
    from cerebro_tasks.search.stopping.hyperband import Hyperband
    from cerebro_tasks.search.stopping.median import MedianStopping

    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"early_stopping must be an object with a 'kind' (one of {KINDS}), got {spec!r}")
    args = {k: v for k, v in spec.items() if k != "kind"}
    kind = spec["kind"]
    classes = {"asha": ASHA, "successive_halving": ASHA, "hyperband": Hyperband, "median": MedianStopping}
    if kind not in classes:
        raise ValueError(f"early_stopping.kind: expected one of {KINDS}, got {kind!r}")
    cls = classes[kind]
    unknown = sorted(set(args) - set(cls.ARGS))
    if unknown:
        raise ValueError(f"early_stopping: {kind} takes {sorted(cls.ARGS)}, not {unknown}")
    for name, value in args.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"early_stopping.{name}: expected an integer, got {value!r}")
    return cls(mode=mode, max_epochs=max_epochs, **args)
