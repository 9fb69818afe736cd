"""Simulation benchmark of the MOP hop scheduler: makespan against its lower bound.

Heterogeneous model-selection workloads (per-model unit cost log-uniform over 10x, per-unit
noise, different epoch counts, val units about 1/3 of a train unit) are run through
``HopScheduler`` on simulated workers, one partition per worker (P = W), for
W in {2, 4, 8, 16} and M in {W/2, W, 2W, 4W}. Reported per (W, M, policy), median over seeds:

* ratio = makespan / max(total unit time / W, longest per-model chain), where a chain is the
  model's train units in sequence plus its longest final-epoch val unit (those run in parallel);
* util = busy seconds / (W x makespan);
* ckpt loads saved = share of train units that reused the weights already in the worker's
  memory (affinity).

Policies: "critical" (longest remaining work first, val as filler; the default), "critical"
with ``eager_validation=True``, and "random" (the original Cerebro's uniform choice, here without
its global epoch barrier, so it is a stronger baseline than the original).

Run from the repo root: ``python bench/scheduler_sim.py`` (standard library only). Writes
``bench/results/scheduler_sim.json``.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cerebro_tasks.mop.scheduler import HopScheduler, Unit  # noqa: E402

WORKERS = (2, 4, 8, 16)
MODEL_FACTORS = (0.5, 1, 2, 4)  # M = factor x W
EPOCH_CHOICES = (2, 3, 4)
REPS = 5
VAL_FRACTION = 1 / 3
NOISE_SIGMA = 0.1  # per-unit lognormal noise
VARIANTS = {  # label -> HopScheduler keyword arguments
    "critical": {"policy": "critical"},
    "critical+eager_val": {"policy": "critical", "eager_validation": True},
    "random": {"policy": "random"},
}


def workload(num_models: int, seed: int) -> tuple[dict[str, int], dict[str, float]]:
    """Per-model epoch counts and mean train-unit cost (log-uniform over [1, 10])."""
    rng = random.Random(seed)
    epochs = {f"m{i:03d}": rng.choice(EPOCH_CHOICES) for i in range(num_models)}
    cost = {m: 10 ** rng.uniform(0.0, 1.0) for m in epochs}
    return epochs, cost


def unit_time(unit: Unit, cost: dict[str, float], seed: int) -> float:
    """A unit's true duration, fixed per unit and seed (independent of dispatch order, so every
    policy faces exactly the same work and the lower bound is policy-independent)."""
    r = random.Random(f"{seed}/{unit.model_id}/{unit.kind}/{unit.epoch}/{unit.partition}")
    base = cost[unit.model_id] * (VAL_FRACTION if unit.kind == "val" else 1.0)
    return base * math.exp(r.gauss(0.0, NOISE_SIGMA))


def lower_bound(epochs: dict[str, int], cost: dict[str, float], W: int, seed: int) -> float:
    """max(total unit time / W, longest per-model chain)."""
    P = W
    total = 0.0
    chain = 0.0
    for m, E in epochs.items():
        train = sum(unit_time(Unit(m, e, "train", p, 0), cost, seed)
                    for e in range(E) for p in range(P))
        vals = [unit_time(Unit(m, e, "val", p, 0), cost, seed) for e in range(E) for p in range(P)]
        total += train + sum(vals)
        chain = max(chain, train + max(vals[-P:]))
    return max(total / W, chain)


def simulate(W: int, epochs: dict[str, int], cost: dict[str, float], seed: int,
             kwargs: dict) -> dict[str, float]:
    """Run one workload to completion; returns makespan, busy time and affinity hits."""
    sched = HopScheduler(W, seed=seed, **kwargs)
    for m, E in epochs.items():
        sched.add_model(m, E)
    for w in range(W):
        sched.worker_joined(f"w{w}", w)
    heap: list[tuple[float, str, Unit]] = []
    now = busy = 0.0
    n_train = 0
    while True:
        for w, u in sched.assign():
            d = unit_time(u, cost, seed)
            busy += d
            n_train += u.kind == "train"
            heapq.heappush(heap, (now + d, w, u))
        if not heap:
            break
        end, w, u = heapq.heappop(heap)
        # The runtime measures each unit's wall time; we hand the scheduler the true duration.
        sched.unit_finished(w, u, duration=unit_time(u, cost, seed))
        now = end
    assert sched.done, "simulation ended with work left"
    return {"makespan": now, "busy": busy, "affinity_hits": sched.affinity_hits,
            "train_units": n_train}


def main() -> int:
    t0 = time.perf_counter()
    rows = []
    for W in WORKERS:
        for f in MODEL_FACTORS:
            M = max(1, int(f * W))
            per_variant: dict[str, dict[str, list[float]]] = {
                v: {"ratio": [], "util": [], "saved": []} for v in VARIANTS}
            for rep in range(REPS):
                seed = 1000 * W + 10 * M + rep
                epochs, cost = workload(M, seed)
                lb = lower_bound(epochs, cost, W, seed)
                for label, kwargs in VARIANTS.items():
                    r = simulate(W, epochs, cost, seed, kwargs)
                    per_variant[label]["ratio"].append(r["makespan"] / lb)
                    per_variant[label]["util"].append(r["busy"] / (W * r["makespan"]))
                    per_variant[label]["saved"].append(r["affinity_hits"] / r["train_units"])
            for label, d in per_variant.items():
                rows.append({
                    "W": W, "M": M, "policy": label,
                    "ratio_median": statistics.median(d["ratio"]),
                    "ratio_max": max(d["ratio"]),
                    "util_median": statistics.median(d["util"]),
                    "ckpt_loads_saved_median": statistics.median(d["saved"]),
                    "ratios": d["ratio"],
                })
    elapsed = time.perf_counter() - t0

    labels = list(VARIANTS)
    head = f"{'W':>3} {'M':>3} | " + " | ".join(f"{lab:^27}" for lab in labels)
    sub = f"{'':>3} {'':>3} | " + " | ".join(f"{'ratio':>7} {'max':>6} {'util':>5} {'saved':>5}"
                                             for _ in labels)
    print("makespan / lower bound (median of %d seeds), utilisation, ckpt loads saved" % REPS)
    print(head)
    print(sub)
    print("-" * len(sub))
    by_key = {(r["W"], r["M"], r["policy"]): r for r in rows}
    for W in WORKERS:
        for f in MODEL_FACTORS:
            M = max(1, int(f * W))
            cells = []
            for lab in labels:
                r = by_key[(W, M, lab)]
                cells.append(f"{r['ratio_median']:7.3f} {r['ratio_max']:6.3f} "
                             f"{r['util_median']:5.2f} {r['ckpt_loads_saved_median']:5.2f}")
            print(f"{W:>3} {M:>3} | " + " | ".join(cells))
    goal = [r for r in rows if r["policy"] == "critical" and r["M"] >= 2 * r["W"]]
    worst = max(r["ratio_median"] for r in goal)
    print(f"\ngoal: median ratio <= 1.05 for M >= 2W with 'critical': worst {worst:.3f} "
          f"-> {'met' if worst <= 1.05 else 'NOT met'}   ({elapsed:.1f} s)")

    out = ROOT / "bench" / "results" / "scheduler_sim.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "scheduler_sim",
        "config": {
            "workers": WORKERS, "model_factors": MODEL_FACTORS, "epoch_choices": EPOCH_CHOICES,
            "reps": REPS, "val_fraction": VAL_FRACTION, "noise_sigma": NOISE_SIGMA,
            "cost": "log-uniform over [1, 10] per model", "partitions": "P = W",
            "variants": VARIANTS,
            "lower_bound": "max(total unit time / W, longest train chain + its longest final val)",
        },
        "goal": {"ratio_median_max_for_M_ge_2W": worst, "met": worst <= 1.05},
        "elapsed_s": elapsed,
        "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
