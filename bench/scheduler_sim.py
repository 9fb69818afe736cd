"""Simulation benchmark of the MOP hop scheduler: makespan against its lower bound.

Heterogeneous model-selection workloads (per-model unit cost log-uniform over 10x, per-unit
noise, different epoch counts, val units about 1/3 of a train unit) are run through
``HopScheduler`` on simulated workers, one partition per worker (P = W), for
W in {2, 4, 8, 16} and M in {W/2, W, 2W, 4W}. Reported per (W, M, policy), median over seeds:

* ratio = makespan / max(total unit time / W, longest per-model chain), where a chain is the
  model's train units in sequence plus its longest final-epoch val unit (those run in parallel);
* max = the worst seed's ratio;
* util = busy seconds / (W x makespan);
* saved = share of units that can skip their checkpoint load (the worker holds those weights);
* lag = mean over models of (last val unit end - last train unit end) / makespan: how late a
  model's final metrics arrive, which is what early stopping and TPE wait for.

Variants: "critical" (the default: critical chains, then val, then the other train units),
"critical/filler" (``val_priority="filler"``: val only where no train unit can run) and
"random" (the original Cerebro's uniform choice; here without its global epoch barrier, so a
stronger baseline than the original). Unit durations are fixed per (seed, unit), so every
variant faces the same work and the same lower bound; the scheduler is told each duration
on ``unit_finished``, as the runtime does.

Run from the repo root: ``python bench/scheduler_sim.py [--reps N]`` (standard library only,
about 25 s of CPU). Writes ``bench/results/scheduler_sim.json``.

``--scale`` instead measures the driver's scheduling cost at cluster scale: the CPU time of the
scheduling the runtime's driver does per finished unit (mop/runtime.py in lockstep mode; not its
I/O, its logging, or the model's history it reads when an epoch closes):
``Lockstep.arrived`` and ``pop_ready``, then for each released result
``HopScheduler.unit_finished`` + ``assign()`` + ``counts()`` (the progress log line) and
``Lockstep.dispatched`` for each new unit, per dispatched unit, with W in {64, 256, 512} workers
and M up to 4,096 models, over a window of dispatches after the first W (goal: <= 1 ms per unit
at W = 512, M = 4,096). Real durations follow the simulated workload; lockstep's virtual ones
are the models' mean costs. Writes ``bench/results/scheduler_scale.json``.
"""

from __future__ import annotations

import argparse
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

from cerebro_tasks.mop.lockstep import Lockstep  # noqa: E402
from cerebro_tasks.mop.scheduler import HopScheduler, Unit  # noqa: E402

WORKERS = (2, 4, 8, 16)
MODEL_FACTORS = (0.5, 1, 2, 4)  # M = factor x W
EPOCH_CHOICES = (2, 3, 4)
REPS = 7
VAL_FRACTION = 1 / 3
NOISE_SIGMA = 0.1  # per-unit lognormal noise
VARIANTS = {  # label -> HopScheduler keyword arguments
    "critical": {"policy": "critical"},
    "critical/filler": {"policy": "critical", "val_priority": "filler"},
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
    """Run one workload to completion.

    Returns makespan, busy time, affinity hits (units that can skip their checkpoint load),
    units dispatched and the mean result lag: the time
    from a model's last train unit to its last val unit (when its final metrics exist, which is
    what early stopping and TPE wait for), as a fraction of the makespan.
    """
    sched = HopScheduler(W, seed=seed, **kwargs)
    for m, E in epochs.items():
        sched.add_model(m, E)
    for w in range(W):
        sched.worker_joined(f"w{w}", w)
    heap: list[tuple[float, str, Unit]] = []
    now = busy = 0.0
    n_units = 0
    train_end: dict[str, float] = {}
    done_at: dict[str, float] = {}
    while True:
        for w, u in sched.assign():
            d = unit_time(u, cost, seed)
            busy += d
            n_units += 1
            heapq.heappush(heap, (now + d, w, u))
        if not heap:
            break
        end, w, u = heapq.heappop(heap)
        now = end
        # The runtime measures each unit's wall time and reports it.
        sched.unit_finished(w, u, duration=unit_time(u, cost, seed))
        if u.kind == "train":
            train_end[u.model_id] = now
        done_at[u.model_id] = now
    assert sched.done, "simulation ended with work left"
    lag = statistics.fmean(done_at[m] - train_end[m] for m in epochs) / now
    return {"makespan": now, "busy": busy, "affinity_hits": sched.affinity_hits,
            "units": n_units, "result_lag": lag}


SCALE_WORKERS = (64, 256, 512)
SCALE_MODELS = (512, 4096)
SCALE_GOAL_MS = 1.0


SCALE_TIMED = ("per finished unit: Lockstep.arrived + pop_ready; per released result: "
               "HopScheduler.unit_finished + assign + counts, Lockstep.dispatched per new unit")


def scale_cost(W: int, M: int, units: int, seed: int = 0) -> dict[str, float]:
    """Driver CPU seconds per dispatched unit over `units` dispatches after the first fill.

    Only the driver's calls are timed (time.process_time), not the simulation around them.
    """
    epochs, cost = workload(M, seed)
    sched = HopScheduler(W, seed=seed)
    for m, E in epochs.items():
        sched.add_model(m, E)
    for w in range(W):
        sched.worker_joined(f"w{w}", w)
    lock = Lockstep(lambda u: cost[u.model_id] * (VAL_FRACTION if u.kind == "val" else 1.0))
    heap: list[tuple[float, str, Unit]] = []  # real finish time of each unit in flight
    for w, u in sched.assign():  # the first fill: W units at once, not the steady state
        lock.dispatched(w, u)
        heapq.heappush(heap, (unit_time(u, cost, seed), w, u))
    clock = time.process_time
    cpu = {"scheduler": 0.0, "counts": 0.0, "lockstep": 0.0}
    dispatched = 0
    while dispatched < units and heap:
        end, w, u = heapq.heappop(heap)
        new: list[tuple[str, Unit]] = []
        t0 = clock()
        lock.arrived(w, end)
        cpu["lockstep"] += clock() - t0
        while True:
            t0 = clock()
            ready = lock.pop_ready()
            cpu["lockstep"] += clock() - t0
            if ready is None:
                break
            w2, u2, _, duration = ready
            t0 = clock()
            sched.unit_finished(w2, u2, duration=duration)
            assigned = sched.assign()
            t1 = clock()
            sched.counts()
            t2 = clock()
            for w3, u3 in assigned:
                lock.dispatched(w3, u3)
            t3 = clock()
            cpu["scheduler"] += t1 - t0
            cpu["counts"] += t2 - t1
            cpu["lockstep"] += t3 - t2
            new += assigned
        for w3, u3 in new:  # outside the timed calls: the workers run them
            heapq.heappush(heap, (end + unit_time(u3, cost, seed), w3, u3))
        dispatched += len(new)
    n = max(1, dispatched)
    total = sum(cpu.values())
    return {"W": W, "M": M, "units": dispatched, "cpu_s": total, "ms_per_unit": 1e3 * total / n,
            **{f"{k}_ms_per_unit": 1e3 * v / n for k, v in cpu.items()}}


def scale_main(units: int) -> int:
    rows = []
    for W in SCALE_WORKERS:
        for M in SCALE_MODELS:
            r = scale_cost(W, M, units)
            rows.append(r)
            print(f"W={W:>4} M={M:>5}: {r['ms_per_unit']:8.3f} ms driver CPU per dispatched unit "
                  f"(scheduler {r['scheduler_ms_per_unit']:.3f}, counts {r['counts_ms_per_unit']:.3f}, "
                  f"lockstep {r['lockstep_ms_per_unit']:.3f}; {r['units']} units)", flush=True)
    worst = next(r for r in rows if r["W"] == 512 and r["M"] == 4096)["ms_per_unit"]
    print(f"goal: <= {SCALE_GOAL_MS} ms per unit at W=512, M=4096: {worst:.3f} ms -> "
          f"{'met' if worst <= SCALE_GOAL_MS else 'NOT met'}")
    out = ROOT / "bench" / "results" / "scheduler_scale.json"
    out.write_text(json.dumps({
        "bench": "scheduler_scale",
        "config": {"workers": SCALE_WORKERS, "models": SCALE_MODELS, "units_measured": units,
                   "policy": "critical (default)", "clock": "time.process_time around the timed calls",
                   "timed": SCALE_TIMED},
        "goal": {"ms_per_unit_at_W512_M4096": worst, "met": worst <= SCALE_GOAL_MS},
        "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=REPS, help="seeds per configuration")
    ap.add_argument("--scale", action="store_true", help="driver CPU per unit at W up to 512, M up to 4096")
    ap.add_argument("--units", type=int, default=2000, help="with --scale: dispatches measured per configuration")
    args = ap.parse_args()
    if args.scale:
        return scale_main(args.units)
    reps = args.reps
    t0 = time.perf_counter()
    rows = []
    for W in WORKERS:
        for f in MODEL_FACTORS:
            M = max(1, int(f * W))
            per_variant: dict[str, dict[str, list[float]]] = {
                v: {"ratio": [], "util": [], "saved": [], "lag": []} for v in VARIANTS}
            for rep in range(reps):
                seed = 1000 * W + 10 * M + rep
                epochs, cost = workload(M, seed)
                lb = lower_bound(epochs, cost, W, seed)
                for label, kwargs in VARIANTS.items():
                    r = simulate(W, epochs, cost, seed, kwargs)
                    per_variant[label]["ratio"].append(r["makespan"] / lb)
                    per_variant[label]["util"].append(r["busy"] / (W * r["makespan"]))
                    per_variant[label]["saved"].append(r["affinity_hits"] / r["units"])
                    per_variant[label]["lag"].append(r["result_lag"])
            for label, d in per_variant.items():
                rows.append({
                    "W": W, "M": M, "policy": label,
                    "ratio_median": statistics.median(d["ratio"]),
                    "ratio_max": max(d["ratio"]),
                    "util_median": statistics.median(d["util"]),
                    "ckpt_loads_saved_median": statistics.median(d["saved"]),
                    "result_lag_median": statistics.median(d["lag"]),
                    "ratios": d["ratio"],
                })
    elapsed = time.perf_counter() - t0

    labels = list(VARIANTS)
    cell_w = 25
    head = f"{'W':>3} {'M':>3} | " + " | ".join(f"{lab:^{cell_w}}" for lab in labels)
    cols = f"{'ratio':>6} {'max':>5} {'util':>4} {'saved':>5} {'lag':>4}"
    sub = f"{'':>3} {'':>3} | " + " | ".join(cols for _ in labels)
    print(f"median of {reps} seeds: ratio = makespan / lower bound (max: worst seed), util = "
          f"busy / (W x makespan),\nsaved = units that can skip their checkpoint load, lag = mean "
          f"(last val - last train) of a model / makespan")
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
                cells.append(f"{r['ratio_median']:6.3f} {r['ratio_max']:5.3f} "
                             f"{r['util_median']:4.2f} {r['ckpt_loads_saved_median']:5.2f} "
                             f"{r['result_lag_median']:4.2f}")
            print(f"{W:>3} {M:>3} | " + " | ".join(cells))
    goal = [r for r in rows if r["policy"] == "critical" and r["M"] >= 2 * r["W"]]
    worst = max(r["ratio_median"] for r in goal)
    print(f"\ngoal: median ratio <= 1.05 for M >= 2W with 'critical': worst {worst:.4f} "
          f"-> {'met' if worst <= 1.05 else 'NOT met'}   ({elapsed:.1f} s)")

    out = ROOT / "bench" / "results" / "scheduler_sim.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "scheduler_sim",
        "config": {
            "workers": WORKERS, "model_factors": MODEL_FACTORS, "epoch_choices": EPOCH_CHOICES,
            "reps": reps, "val_fraction": VAL_FRACTION, "noise_sigma": NOISE_SIGMA,
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
