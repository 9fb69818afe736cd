"""The run journal: one small JSON file per finished unit, written atomically into the store.

A unit's record is written before the driver tells the scheduler the unit is done, and a unit
has exactly one record name, so a unit run twice (a worker died after writing but before
reporting) cannot be counted twice. Resume = read every record and replay it into a fresh
scheduler: at most the units that were in flight when the driver died are redone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from cerebro_tasks.mop import metric_state
from cerebro_tasks.mop.scheduler import Unit
from cerebro_tasks.storage.store import Store
from cerebro_tasks.storage import layout

JOURNAL_DIR = layout.JOURNAL_DIR


def record_name(unit: Unit) -> str:
    return f"{unit.model_id}.e{unit.epoch:04d}.{unit.kind}.p{unit.partition:04d}.json"


class Journal:
    """Finished units of one run, kept in `<run>/journal/`."""

    def __init__(self, run_store: Store) -> None:
        self.store = run_store

    def record(self, unit: Unit, result: dict[str, Any]) -> None:
        self.store.write_json({"unit": asdict(unit), **result}, JOURNAL_DIR, record_name(unit))

    def records(self) -> list[dict[str, Any]]:
        """Every finished unit, ordered by the time it ended."""
        out = [self.store.read_json(JOURNAL_DIR, n) for n in self.store.listdir(JOURNAL_DIR) if n.endswith(".json") and not n.startswith(".")]
        return sorted(out, key=lambda r: (r.get("end", 0.0), record_name(Unit(**r["unit"]))))

    @staticmethod
    def unit_of(record: dict[str, Any]) -> Unit:
        return Unit(**record["unit"])


def _number(value: Any) -> float:
    # JSON has no NaN: a diverged metric is stored as null and comes back as None
    return float("nan") if value is None else float(value)


def resume_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in an order a fresh scheduler accepts: training by step, then validation.

    Never by the workers' clocks, which differ between hosts.
    """
    return sorted(records, key=lambda r: (r["unit"]["kind"] != "train", r["unit"]["step"], r["unit"]["epoch"],
                                          r["unit"]["model_id"], r["unit"]["partition"]))


def histories(records: list[dict[str, Any]], num_partitions: int) -> dict[str, dict[str, list[float]]]:
    """Per model, per-epoch `train_<metric>` and `val_<metric>` lists.

    A metric whose units reported its state (``metric_state``) is computed once from the state
    summed over the partitions: the figure of the whole epoch's data (mop/metric_state.py).
    Others are averaged weighted by the number of samples each partition held (not by batches,
    which is what Cerebro did and which over-weights small partitions' last batch). An epoch
    appears only once all of its partitions reported, so a history never mixes a complete epoch
    with a partial one.
    """
    acc: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in records:
        u = r["unit"]
        acc.setdefault((u["model_id"], u["kind"], u["epoch"]), []).append(r)
    out: dict[str, dict[str, list[float]]] = {}
    for (model_id, kind, epoch), recs in sorted(acc.items(), key=lambda kv: kv[0]):
        if len(recs) < num_partitions:
            continue
        h = out.setdefault(model_id, {})
        # an empty partition (fewer subjects than workers) reports no metrics and weighs nothing
        names = sorted({name for r in recs for name in r["metrics"]})
        for name in names:
            reporting = [r for r in recs if name in r["metrics"] and r["num_samples"] > 0]
            value = _merged(name, reporting)
            if value is None:
                weighted = [(_number(r["metrics"][name]), r["num_samples"]) for r in reporting]
                total = sum(n for _, n in weighted)
                value = sum(v * n for v, n in weighted) / total if total > 0 else float("nan")
            series = h.setdefault(f"{kind}_{name}", [])
            # epochs arrive in order per (model, kind) thanks to the sort; keep position == epoch
            while len(series) < epoch:
                series.append(float("nan"))
            series.append(float(value))
    return out


def _merged(name: str, records: list[dict[str, Any]]) -> float | None:
    """``name`` computed from its state summed over ``records``; None when some record lacks it
    (a journal from before states were kept, or a metric without a known mergeable state)."""
    entries = [r.get("metric_state", {}).get(name) for r in records]
    if not entries or any(e is None or not metric_state.supported(e) for e in entries):
        return None
    value = metric_state.result(metric_state.merge(entries))
    return float(value) if isinstance(value, float) else None  # a vector (several thresholds): no scalar figure
