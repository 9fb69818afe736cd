"""The figures that judge a MOP run, computed from its unit records, and the timeline plot.

- utilisation: busy seconds / (W x makespan);
- hop overhead: per worker, the gap between one unit's end and the next unit's start, plus the
  unit's data read, model build, state read and checkpoint write (and whole models of earlier
  units it had to write first, mop/worker.py), as a fraction of the time spent training or
  evaluating;
- true hop cost (shared/reference/mop.md): the median time of units whose model came from
  elsewhere over the median time of the same unit (same model, same kind, same number of
  samples) on a model that stayed on its worker, so re-tracing counts as the hop's, not as
  compute. Split by how the model arrived: "warm" (the worker had built it, or another model of
  its graph, before and only read its state) and "cold" (built on the worker for this unit). The
  worker's one-off data read is left out of both. A model's first unit on a graph the worker
  already built ("new": made from its seed, its initial state read into the traced model) is not
  a hop: the model starts there. Whole models of earlier units a worker writes before a unit
  (mop/worker.py) are left out too: they are those units' checkpoint writes, not this hop's.
Worker-side timestamps are compared only within one worker, so clock skew between machines does
not distort the figures.
"""

from __future__ import annotations

import statistics
from typing import Any

ARRIVALS = ("stayed", "warm", "cold", "new")


def timeline_figures(records: list[dict[str, Any]], num_workers: int) -> dict[str, Any]:
    if not records:
        return {"units": 0}
    by_worker: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_worker.setdefault(int(r.get("partition", r["unit"]["partition"])), []).append(r)
    start = min(r["start"] for r in records)
    end = max(r["end"] for r in records)
    makespan = max(end - start, 1e-9)
    busy = sum(r["end"] - r["start"] for r in records)
    compute = sum(r["compute_s"] for r in records)
    gaps = 0.0
    for rs in by_worker.values():
        rs.sort(key=lambda r: r["start"])
        gaps += sum(max(0.0, b["start"] - a["end"]) for a, b in zip(rs, rs[1:]))
    io = sum(r.get("data_s", 0.0) + r["load_s"] + r["save_s"] + r.get("behind_s", 0.0) for r in records)
    build = sum(r.get("build_s", 0.0) for r in records)
    return {
        "units": len(records),
        "workers": num_workers,
        "makespan_s": makespan,
        "busy_s": busy,
        "utilisation": busy / (num_workers * makespan),
        "compute_utilisation": compute / (num_workers * makespan),
        "hop_overhead": (gaps + io + build) / max(compute, 1e-9),
        "gap_s": gaps,
        "checkpoint_io_s": io,
        "build_s": build,
        "mean_unit_s": busy / len(records),
        "reused_models": sum(1 for r in records if r.get("reused_model")),
        "arrivals": {a: sum(1 for r in records if arrival(r) == a) for a in ARRIVALS},
        **hop_cost(records),
    }


def arrival(record: dict[str, Any]) -> str:
    """How a unit's model came to its worker; records from before warm models say only if it stayed."""
    return record.get("arrival") or ("stayed" if record.get("reused_model") else "cold")


def hop_cost(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The true hop cost overall and by arrival (None where no unit pairs up); see the module doc."""
    groups: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for r in records:
        key = (r["unit"]["model_id"], r["unit"]["kind"], int(r.get("num_samples", 0)))
        seconds = r["end"] - r["start"] - r.get("data_s", 0.0) - r.get("behind_s", 0.0)
        groups.setdefault(key, {a: [] for a in ARRIVALS})[arrival(r)].append(seconds)
    ratios: dict[str, list[float]] = {"hop_cost": [], "hop_cost_warm": [], "hop_cost_cold": []}
    for g in groups.values():
        if not g["stayed"]:
            continue
        stayed = statistics.median(g["stayed"])
        for name, hopped in (("hop_cost", g["warm"] + g["cold"]), ("hop_cost_warm", g["warm"]),
                             ("hop_cost_cold", g["cold"])):
            if hopped:
                ratios[name].append(statistics.median(hopped) / max(stayed, 1e-9))
    out: dict[str, Any] = {name: statistics.median(v) if v else None for name, v in ratios.items()}
    out["hop_cost_pairs"] = len(ratios["hop_cost"])  # (model, kind, size) groups with both kinds of unit
    return out


def plot_timeline(records: list[dict[str, Any]], path: str, title: str = "MOP timeline") -> str:
    """A Gantt chart of units per worker (colour = model, hatched = validation); writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["unit"]["model_id"] for r in records})
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(models)}
    t0 = min((r["start"] for r in records), default=0.0)
    partitions = sorted({int(r["unit"]["partition"]) for r in records})
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.6 * len(partitions)))
    for r in records:
        u = r["unit"]
        ax.barh(int(u["partition"]), r["end"] - r["start"], left=r["start"] - t0, height=0.6,
                color=colours[u["model_id"]], edgecolor="black", linewidth=0.3,
                hatch="//" if u["kind"] == "val" else None)
    ax.set_yticks(partitions, [f"worker {p}" for p in partitions])
    ax.set_xlabel("seconds since first unit")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in models[:20]]
    ax.legend(handles, models[:20], fontsize=7, ncol=min(8, max(1, len(models))), loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(f"{title} (hatched: validation)", pad=22)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
