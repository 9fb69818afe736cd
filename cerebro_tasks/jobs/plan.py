"""What one run of `deeppostures_model_selection` does: retrain or not, predict whom, with what.

A scheduled or backfill run stands for its data interval [start, end): it works on the dataset as
of `end` (the files that had arrived by then, :mod:`cerebro_tasks.deeppostures.arrivals`) and
predicts the subjects with a file arriving in [start, end). A manual or Asset-triggered run
stands for "now": all converted data, and the subjects no run has predicted yet (the prediction
ledger). The `retrain` policy then says whether the run trains a new model:

- ``always``: every run trains (on the dataset as of its end);
- ``new_data``: only when subjects arrived (as above);
- ``never``: never; predictions use the model in force.

A run that does not train predicts with the model in force at its `as_of`: the export with the
latest `as_of` not after it (:func:`cerebro_tasks.deeppostures.export.model_in_force`). Pure
decisions from small files (the manifest, the ledger, export metadata): no Spark.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from cerebro_tasks.errors import ConfigError

RETRAIN_POLICIES = ("always", "new_data", "never")
WINDOWED_RUN_TYPES = ("scheduled", "backfill")


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.astimezone(_dt.timezone.utc).isoformat()
    return str(value)


def plan_run(params: dict[str, Any], *, run_type: str, interval: tuple[Any, Any],
             now: _dt.datetime | None = None) -> dict[str, Any]:
    """The run's plan (XCom-sized): `branches` (task ids among "split" and "predict"), the
    instants (`as_of`, `data_as_of`, `since`), who is predicted and with which model.

    Raises ConfigError when the run cannot do what it must: subjects to predict but no model in
    force and a policy that will not train one, or nothing to train on.
    """
    from cerebro_tasks.deeppostures.arrivals import arrived_subjects, files_as_of, manifest_files, to_ns
    from cerebro_tasks.deeppostures.export import model_in_force
    from cerebro_tasks.jobs.predict import LEDGER
    from cerebro_tasks.storage.store import Store

    policy = params.get("retrain", "new_data")
    if policy not in RETRAIN_POLICIES:
        raise ConfigError(f"retrain: expected one of {RETRAIN_POLICIES}, got {policy!r}")
    run_type = str(getattr(run_type, "value", run_type))
    start, end = _iso(interval[0]), _iso(interval[1])
    as_of = end or _iso(now or _dt.datetime.now(_dt.timezone.utc))
    windowed = run_type in WINDOWED_RUN_TYPES and start is not None and end is not None
    files = manifest_files(params["dataset_url"])
    if windowed:
        present = sorted({e["subject"] for e in files_as_of(files, to_ns(as_of)).values()})
        arrived = arrived_subjects(files, to_ns(start), to_ns(end))
    else:
        present = sorted({e["subject"] for e in files.values()})
        predictions = Store(params["predictions_url"])
        ledger = predictions.read_json(LEDGER)["subjects"] if predictions.exists(LEDGER) else {}
        arrived = [s for s in present if s not in ledger]
    to_predict = present if params.get("predict_all") else arrived
    retrain = policy == "always" or (policy == "new_data" and bool(arrived))
    model = None if retrain else model_in_force(params["export_url"], as_of)
    if retrain and not present:
        raise ConfigError(f"retrain: no data to train on as of {as_of} in {params['dataset_url']} "
                          f"(no converted file had arrived by then)")
    if to_predict and not retrain and model is None:
        raise ConfigError(f"retrain={policy!r}: {len(to_predict)} subject(s) to predict but no model in force as of "
                          f"{as_of} in {params['export_url']}; a run with retrain='always' trains one")
    branches = (["split"] if retrain else []) + (["predict"] if to_predict else [])
    return {
        "run_type": run_type,
        "policy": policy,
        "as_of": as_of,
        "data_as_of": as_of if windowed else None,
        "since": start if windowed and not params.get("predict_all") else None,
        "which": "all" if params.get("predict_all") else ("arrived" if windowed else "new"),
        "subjects": len(present),
        "arrived": arrived[:100],  # XCom stays small; the prediction step recomputes the full list
        "to_predict": len(to_predict),
        "retrain": retrain,
        "export_url": model,
        "model_name": f"deeppostures-{model.rstrip('/').rsplit('/', 1)[-1]}" if model else None,
        "branches": branches,
    }
