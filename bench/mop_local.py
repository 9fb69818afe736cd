"""MOP on this machine: 2 Spark workers vs the same models trained one after another on one worker.

The sequential baseline runs twice, each in a fresh process (TensorFlow fixes its thread pools
once): on one MOP worker's share of the machine (its cores: what "one worker" means, and the
goal's baseline), and on the whole machine (every core for one model: what a user without MOP
would do on this box; small models gain little from the second thread, so MOP's lead is larger).
Measures worker utilisation (busy / (W x makespan)), hop overhead (gaps between units on a worker
plus checkpoint load and save, as a fraction of unit compute time) and the equivalence of the final
validation loss, with units long enough (>= 5 s) for the goals of issue 4 to apply. The main
figures are for the default lockstep schedule (same seed, same schedule); the same search with the
adaptive schedule (no waiting for virtual turns) gives the price of that determinism. Writes
bench/results/mop_local.json and a timeline plot beside it.

    python bench/mop_local.py [--rows 300000] [--models 4] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import RESULTS, ROOT, train_one_after_another, write_results  # bench/ is this script's folder, first on sys.path

sys.path.insert(0, ROOT)

from cerebro_tasks.mop.runtime import run_mop  # noqa: E402
from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload  # noqa: E402
from cerebro_tasks.mop.timeline import plot_timeline  # noqa: E402
from cerebro_tasks.mop.workload import ModelSpec  # noqa: E402
from cerebro_tasks.spark_session import get_spark  # noqa: E402

WORKERS = 2


def setup(args: argparse.Namespace) -> tuple[SyntheticWorkload, list[ModelSpec]]:
    workload = SyntheticWorkload(rows_per_partition=args.rows, features=32, batch_size=64)
    lrs = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-2]
    specs = [ModelSpec(f"m{i}", {"lr": lrs[i % len(lrs)], "hidden": 32}, args.epochs, seed=i) for i in range(args.models)]
    return workload, specs


def sequential_in_process(args: argparse.Namespace, threads: int) -> dict:
    """`train_one_after_another` (bench/_common.py) in a fresh Python whose TensorFlow uses `threads`
    threads, as a MOP worker with that many cores does (mop/worker.py, configure_devices)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--sequential-threads", str(threads), "--rows", str(args.rows),
           "--models", str(args.models), "--epochs", str(args.epochs)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="training rows per partition (sets unit length: ~9 s)")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sequential-threads", type=int, default=None, help=argparse.SUPPRESS)  # the baseline's process
    args = parser.parse_args()
    workload, specs = setup(args)
    if args.sequential_threads is not None:
        from cerebro_tasks.mop.worker import configure_devices

        configure_devices([], args.sequential_threads)
        print(json.dumps(train_one_after_another(workload, specs, WORKERS)))
        return
    spark = get_spark("bench-mop-local", master=f"local[{WORKERS}]")
    with tempfile.TemporaryDirectory() as d:
        started = time.time()
        result = run_mop(spark, workload, specs, os.path.join(d, "run"), num_workers=WORKERS, seed=0)
        mop_seconds = time.time() - started
        adaptive = run_mop(spark, workload, specs, os.path.join(d, "adaptive"), num_workers=WORKERS, seed=0,
                           schedule="adaptive")
    spark.stop()
    os.makedirs(RESULTS, exist_ok=True)
    plot_path = os.path.join(RESULTS, "mop_local_timeline.png")
    plot_timeline(result.records, plot_path, title=f"MOP, {args.models} models x {args.epochs} epochs on {WORKERS} workers")

    cores = os.cpu_count() or WORKERS
    seq = sequential_in_process(args, max(1, cores // WORKERS))  # one worker's share: the goal's baseline
    whole = sequential_in_process(args, cores)
    train_units = [r["compute_s"] for r in result.records if r["unit"]["kind"] == "train"]
    busy = sum(r["end"] - r["start"] for r in result.records)  # MOP's worker-seconds of units
    f = result.figures
    mop_loss = {m: h["val_loss"][-1] for m, h in result.histories.items()}
    figures = {
        "workers": WORKERS, "models": args.models, "epochs": args.epochs, "rows_per_partition": args.rows,
        "median_train_unit_s": statistics.median(train_units),
        "mop_wall_s": round(mop_seconds, 2), "mop_makespan_s": round(f["makespan_s"], 2),
        "utilisation": round(f["utilisation"], 4), "compute_utilisation": round(f["compute_utilisation"], 4),
        "hop_overhead": round(f["hop_overhead"], 4), "gap_s": round(f["gap_s"], 3),
        "checkpoint_io_s": round(f["checkpoint_io_s"], 3), "reused_models": f["reused_models"],
        "sequential_threads": max(1, cores // WORKERS), "sequential_s": round(seq["seconds"], 2),
        "speedup_vs_sequential": round(seq["seconds"] / f["makespan_s"], 3),
        # the same work done by MOP's workers, over what one worker alone spends on it: what is left
        # of the 2x once hops and idling are accounted for (per-worker first traces, two processes
        # sharing the machine)
        "mop_unit_seconds": round(busy, 2), "mop_unit_seconds_over_sequential": round(busy / seq["seconds"], 3),
        "sequential_whole_machine_threads": cores, "sequential_whole_machine_s": round(whole["seconds"], 2),
        "speedup_vs_sequential_whole_machine": round(whole["seconds"] / f["makespan_s"], 3),
        "final_val_loss_mop": mop_loss, "final_val_loss_sequential": seq["final_val_loss"],
        "max_abs_val_loss_diff": max(abs(mop_loss[m] - seq["final_val_loss"][m]) for m in mop_loss),
        "timeline_png": os.path.relpath(plot_path, ROOT),
        "adaptive_makespan_s": round(adaptive.figures["makespan_s"], 2),
        "adaptive_utilisation": round(adaptive.figures["utilisation"], 4),
        "lockstep_vs_adaptive_makespan": round(f["makespan_s"] / adaptive.figures["makespan_s"], 3),
    }
    write_results("mop_local", figures)
    print(f"MOP on {WORKERS} workers: {args.models} models x {args.epochs} epochs, median train unit "
          f"{figures['median_train_unit_s']:.1f} s")
    print(f"  makespan {figures['mop_makespan_s']:.1f} s, utilisation {figures['utilisation']:.3f}, "
          f"hop overhead {figures['hop_overhead']:.3f} (gaps {figures['gap_s']:.2f} s, checkpoint I/O "
          f"{figures['checkpoint_io_s']:.2f} s, {figures['reused_models']} reloads saved)")
    print(f"  sequential on one worker ({figures['sequential_threads']} core): {figures['sequential_s']:.1f} s -> "
          f"speed-up {figures['speedup_vs_sequential']:.2f}x; on the whole machine ({cores} cores): "
          f"{figures['sequential_whole_machine_s']:.1f} s -> {figures['speedup_vs_sequential_whole_machine']:.2f}x")
    print(f"  MOP's units took {figures['mop_unit_seconds']:.1f} worker-s for the work one worker alone does in "
          f"{figures['sequential_s']:.1f} s ({figures['mop_unit_seconds_over_sequential']:.2f}x)")
    print(f"  final val loss, MOP vs sequential: max difference {figures['max_abs_val_loss_diff']:.4f}")
    print(f"  adaptive schedule: makespan {figures['adaptive_makespan_s']:.1f} s, utilisation "
          f"{figures['adaptive_utilisation']:.3f} -> lockstep takes {figures['lockstep_vs_adaptive_makespan']:.3f}x")


if __name__ == "__main__":
    main()
