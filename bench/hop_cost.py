"""The true cost of a hop and a worker's memory while models hop, on the DeepPostures CNN-BiLSTM.

Two MOP workers' unit runners (mop/worker.py, the code the Spark workers run) share one run
store in this process; each model trains two steps on one worker, then hops to the other, and so
on, so every worker sees both kinds of train unit of the same model on the same partition size:
one whose model hopped in, one whose model stayed. The true hop cost (shared/reference/mop.md) is
median(hopped-in unit) / median(stayed unit), from mop/timeline.py. "before" runs the same
schedule through the worker code as it was before warm models (loaded from git: ``keras.saving.
load_model`` after ``clear_session`` on every hop, a ``.keras`` checkpoint after every unit);
"after" is the current code. Memory: four models take turns on one worker (every unit a hop in),
resident memory is sampled every few units, and the growth per unit after the first round of
warm-up is the figure (goal: <= 2 MB per unit over 200+ units).

    python bench/hop_cost.py [--quick]

Writes bench/results/hop_cost.json. The demo's units are 640 sequences of 3 minutes (T = 18).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from _common import RESULTS, ROOT, write_results  # bench/ is this script's folder, first on sys.path

sys.path.insert(0, ROOT)

from cerebro_tasks.deeppostures.synthetic_workload import SyntheticCnnBilstmWorkload  # noqa: E402
from cerebro_tasks.mop.model_cache import rss_bytes  # noqa: E402
from cerebro_tasks.mop.scheduler import Unit  # noqa: E402
from cerebro_tasks.mop.timeline import hop_cost  # noqa: E402
from cerebro_tasks.mop.workload import ModelSpec  # noqa: E402
from cerebro_tasks.storage.store import Store  # noqa: E402

# the worker before warm models (the commit that introduced them is its child)
BEFORE_COMMIT = "5084090"


def worker_module(version: str) -> Any:
    """mop/worker.py as it is now ("after") or as it was at BEFORE_COMMIT ("before")."""
    if version == "after":
        from cerebro_tasks.mop import worker

        return worker
    source = subprocess.run(["git", "-C", ROOT, "show", f"{BEFORE_COMMIT}:cerebro_tasks/mop/worker.py"],
                            capture_output=True, text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "worker_before.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("worker_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runners(version: str, workload: Any, store: Store, num: int) -> list[Any]:
    mod = worker_module(version)
    if version == "after":
        return [mod.UnitRunner(workload, store, p, num_partitions=num) for p in range(num)]
    return [mod.UnitRunner(workload, store, p) for p in range(num)]


def hop_schedule(version: str, params: dict[str, Any], sequences: int, models: int, visits: int,
                 folder: str) -> dict[str, Any]:
    """Every model: 2 train steps on worker 0, 2 on worker 1, 2 on worker 0, ... (`visits` in all).

    Visits 0 and 1 build the model on each worker (cold); on the current code visits 2 and 3 are
    each worker's first warm visit and visits 4 and after the steady state. (They differed while
    every build seeded TensorFlow: ``tf.random.set_seed`` clears TensorFlow's kernel cache, so each
    warm model re-instantiated its functions once after another model was built; now only a
    model's very first unit seeds.)
    """
    workload = SyntheticCnnBilstmWorkload(sequences_per_partition=sequences, batch_size=16)
    store = Store(os.path.join(folder, f"{version}-{params['amp_factor']}-{sequences}"))
    workers = runners(version, workload, store, 2)
    # (one model in this bench; more of the same params would share a built model per worker)
    specs = [ModelSpec(f"m{i}", params, 99, seed=i) for i in range(models)]
    records = []
    step = dict.fromkeys((s.model_id for s in specs), 0)
    for visit in range(visits):
        p = visit % 2
        for s in specs:
            for _ in range(2):
                unit = Unit(s.model_id, step[s.model_id] // 2, "train", p, step[s.model_id])
                records.append({"unit": asdict(unit), "partition": p, "visit": visit, **workers[p].run(unit, s)})
                step[s.model_id] += 1

    def med(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r.get(key, 0.0) if key != "unit_s" else r["end"] - r["start"] - r.get("data_s", 0.0) for r in rs]
        return round(statistics.median(vals), 4) if vals else None

    def parts(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: med(rs, k) for k in ("unit_s", "build_s", "load_s", "compute_s", "save_s")} | {"units": len(rs)}

    out: dict[str, Any] = {"units": len(records)}
    for name, first in (("visits_0_1", 0), ("visits_2_3", 2), ("visits_4_on", 4)):
        rs = [r for r in records if first <= r["visit"] < (first + 2 if first < 4 else visits)]
        out[name] = {**hop_cost(rs),
                     "stayed": parts([r for r in rs if r.get("reused_model")]),
                     "hopped": parts([r for r in rs if not r.get("reused_model")])}
    return out


def memory(version: str, params: dict[str, Any], sequences: int, models: int, units: int,
           folder: str, every: int) -> dict[str, Any]:
    """Models take turns on one worker; RSS every `every` units after the first round."""
    workload = SyntheticCnnBilstmWorkload(sequences_per_partition=sequences, batch_size=16)
    store = Store(os.path.join(folder, f"mem-{version}"))
    (worker,) = runners(version, workload, store, 1)
    # one graph (mop/model_cache.py): the worker holds one built model and every unit reads its
    # model's state into it, a hop in; models of their own graphs would each stay where they are
    specs = [ModelSpec(f"m{i}", params, 10_000, seed=i) for i in range(models)]
    samples = []
    arrivals: dict[str, int] = {}
    started = time.time()
    for n in range(units):
        s = specs[n % models]
        arrival = worker.run(Unit(s.model_id, 0, "train", 0, n // models), s).get("arrival", "rebuilt")
        arrivals[arrival] = arrivals.get(arrival, 0) + 1
        if (n + 1) % every == 0:
            samples.append([n + 1, round(rss_bytes() / (1 << 20), 1)])
    warm = [(n, mb) for n, mb in samples if n >= 2 * models]  # after every model's build and 2nd trace
    growth = (warm[-1][1] - warm[0][1]) / (warm[-1][0] - warm[0][0]) if len(warm) > 1 else None
    return {"units": units, "models": models, "sequences": sequences, "rss_mb": samples, "arrivals": arrivals,
            "growth_mb_per_unit": None if growth is None else round(growth, 3),
            "seconds": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small units (a smoke run)")
    parser.add_argument("--only", choices=["hop", "memory"], default=None,
                        help="run one part; the other's figures stay as they are in the results file")
    parser.add_argument("--case", action="append", metavar="AMP:SEQUENCES",
                        help="amp factor and sequences per unit (repeatable; default 0.25:640 and 1:640, the "
                             "demo's unit size)")
    args = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from cerebro_tasks.mop.worker import configure_devices

    configure_devices([], 1)  # as a MOP worker with one core
    demo = 64 if args.quick else 640
    cases = []
    for case in args.case or [f"0.25:{demo}", f"1:{demo}"]:
        amp, sequences = case.split(":")
        cases.append((f"amp {amp}, {sequences} sequences", float(amp), int(sequences)))
    visits = 6
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0],
                               "window_minutes": 3, "batch_size": 16, "visits": visits, "hop_cost": {}}
    name = "hop_cost_quick" if args.quick else "hop_cost"
    if args.only:  # the other part's figures as the last full run left them
        with open(os.path.join(RESULTS, f"{name}.json")) as f:
            loaded = json.load(f)
        figures = {**loaded, **figures, "hop_cost": loaded.get("hop_cost", {}) if args.only == "memory" else {}}
    with tempfile.TemporaryDirectory() as d:
        for label, amp, sequences in (cases if args.only != "memory" else []):
            params = {"amp_factor": amp, "window_minutes": 3, "learning_rate": 1e-3}
            row: dict[str, Any] = {"sequences_per_unit": sequences}
            for version in ("after", "before"):
                row[version] = r = hop_schedule(version, params, sequences, 1, visits, d)
                for phase in ("visits_2_3", "visits_4_on"):
                    f = r[phase]
                    if f["hop_cost"] is None:
                        continue
                    print(f"{label} [{version}, {phase}]: true hop cost {f['hop_cost']:.2f} (stayed unit "
                          f"{f['stayed']['unit_s']:.2f} s; hopped-in {f['hopped']['unit_s']:.2f} s: build "
                          f"{f['hopped']['build_s']:.2f} s, state read {f['hopped']['load_s']:.3f} s, compute "
                          f"{f['hopped']['compute_s']:.2f} s, write {f['hopped']['save_s']:.3f} s)", flush=True)
            figures["hop_cost"][label] = row
        if args.only != "hop":
            params = {"amp_factor": 0.25, "window_minutes": 3, "learning_rate": 1e-3}
            mem_units = 40 if args.quick else 208
            figures["memory"] = {
                "after": memory("after", params, 32, 4, mem_units, d, every=8),
                # the old path re-traces on every unit (seconds each): fewer units show its slope
                "before": memory("before", params, 32, 4, 24, d, every=4),
            }
            for version, m in figures["memory"].items():
                print(f"memory [{version}]: {m['units']} units of {m['models']} models taking turns on one worker: "
                      f"RSS {m['rss_mb'][0][1]:.0f} -> {m['rss_mb'][-1][1]:.0f} MB, growth after warm-up "
                      f"{m['growth_mb_per_unit']} MB/unit ({m['seconds']} s)", flush=True)
    figures["load_avg_at_end"] = os.getloadavg()[0]
    path = write_results(name, figures)
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
