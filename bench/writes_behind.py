"""Whole models written behind (mop/worker.py): the same MOP search with each epoch's `.keras` written
within its unit and written behind, side by side in one run.

The DeepPostures CNN-BiLSTM on generated sequences (the demo's unit: 640 sequences of 3 minutes at
amp 0.25), M models x E epochs on 2 Spark workers, the default lockstep schedule. For each way it
reports the checkpoint writes on the units' path (median per epoch-end train unit, and in all),
the whole models written behind (how many, their seconds, none of them on a unit's path), the
makespan (each way run twice, A B B A: this machine's speed drifts by 10-20 %), and whether the
schedule and every model's history came out the same (they must: the writes are not scheduling
events). Writes bench/results/writes_behind.json.

    python bench/writes_behind.py [--models 4] [--epochs 3] [--sequences 640] [--amp 0.25] [--repeats 2] [--behind-first]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _common import ROOT, write_results  # bench/ is this script's folder, first on sys.path

sys.path.insert(0, ROOT)

from cerebro_tasks.deeppostures.synthetic_workload import SyntheticCnnBilstmWorkload  # noqa: E402
from cerebro_tasks.mop.runtime import run_mop  # noqa: E402
from cerebro_tasks.mop.workload import ModelSpec  # noqa: E402
from cerebro_tasks.spark_session import get_spark  # noqa: E402

WORKERS = 2


def figures(result, wall_s: float) -> dict:
    f = result.figures
    train = [r for r in result.records if r["unit"]["kind"] == "train"]
    epoch_end = [r for r in train if (r["unit"]["step"] + 1) % WORKERS == 0]
    mid = [r for r in train if (r["unit"]["step"] + 1) % WORKERS]
    return {
        "wall_s": round(wall_s, 2),
        "makespan_s": round(f["makespan_s"], 2),
        "utilisation": round(f["utilisation"], 4),
        "gap_s": round(f["gap_s"], 2),
        "units": f["units"],
        "epoch_end_unit_save_s_median": round(statistics.median(r["save_s"] for r in epoch_end), 4),
        "mid_epoch_unit_save_s_median": round(statistics.median(r["save_s"] for r in mid), 4),
        "epoch_end_unit_compute_s_median": round(statistics.median(r["compute_s"] for r in epoch_end), 3),
        # what writing checkpoints cost the units themselves (their save, and writes behind earlier
        # units a unit had to finish before it could start)
        "save_on_unit_path_s": round(sum(r["save_s"] + r.get("behind_s", 0.0) for r in result.records), 3),
        "units_that_waited_for_a_write_behind": sum(1 for r in result.records if r.get("behind_s", 0.0) > 0.01),
        "checkpoint_io_s": round(f["checkpoint_io_s"], 3),
        "wholes_written_behind": f.get("wholes_written_behind", 0),
        "whole_behind_s": f.get("whole_behind_s", 0.0),
        "wholes_dropped": f.get("wholes_dropped", 0),
        "true_hop_cost": f.get("hop_cost"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=640, help="training sequences per partition (unit size)")
    parser.add_argument("--amp", type=float, default=0.25, help="the CNN-BiLSTM's amp factor (its width)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way (order A B B A ...)")
    parser.add_argument("--behind-first", action="store_true", help="start with writes behind (B A A B ...)")
    args = parser.parse_args()
    workload = SyntheticCnnBilstmWorkload(sequences_per_partition=args.sequences, batch_size=16)
    specs = [ModelSpec(f"m{i}", {"amp_factor": args.amp, "window_minutes": 3, "learning_rate": lr}, args.epochs,
                       seed=i) for i, lr in zip(range(args.models), [1e-3, 3e-3, 3e-4, 1e-2, 1e-4, 3e-2] * 4)]
    spark = get_spark("bench-writes-behind", master=f"local[{WORKERS}]")
    out: dict = {"models": args.models, "epochs": args.epochs, "workers": WORKERS, "sequences_per_unit": args.sequences,
                 "amp_factor": args.amp}
    results: dict = {}
    runs: dict = {"within_unit": [], "behind": []}
    with tempfile.TemporaryDirectory() as d:
        # each way twice, in the order A B B A, so that drift in this machine's speed falls on both
        pair = [("within_unit", False), ("behind", True)][::-1 if args.behind_first else 1]
        for i, (label, behind) in enumerate(pair + pair[::-1] * (args.repeats - 1)):
            started = time.time()
            results[label] = run_mop(spark, workload, specs, os.path.join(d, f"{label}-{i}"), num_workers=WORKERS,
                                     seed=0, write_behind=behind)
            runs[label].append(figures(results[label], time.time() - started))
            print(label, runs[label][-1], flush=True)
    spark.stop()
    for label, rs in runs.items():
        # each figure's median over the runs, and every run's figures
        out[label] = {k: round(statistics.median(r[k] for r in rs if r[k] is not None), 4) for k, v in rs[0].items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)} | {"runs": rs}
    a, b = results["within_unit"], results["behind"]
    out["same_schedule"] = ([(r["worker_id"], r["unit"]) for r in a.records]
                            == [(r["worker_id"], r["unit"]) for r in b.records])
    out["same_histories"] = a.histories == b.histories
    out["epoch_end_save_ratio"] = round(out["behind"]["epoch_end_unit_save_s_median"]
                                        / max(out["within_unit"]["epoch_end_unit_save_s_median"], 1e-9), 3)
    out["save_on_unit_path_ratio"] = round(out["behind"]["save_on_unit_path_s"]
                                           / max(out["within_unit"]["save_on_unit_path_s"], 1e-9), 3)
    out["makespan_ratio"] = round(out["behind"]["makespan_s"] / out["within_unit"]["makespan_s"], 3)
    print(f"epoch-end unit save: {out['within_unit']['epoch_end_unit_save_s_median']:.3f} s -> "
          f"{out['behind']['epoch_end_unit_save_s_median']:.3f} s ({out['epoch_end_save_ratio']}x); checkpoint writes "
          f"on the units' path {out['within_unit']['save_on_unit_path_s']:.2f} s -> {out['behind']['save_on_unit_path_s']:.2f} s; "
          f"{out['behind']['wholes_written_behind']} wholes written behind in {out['behind']['whole_behind_s']:.2f} s; "
          f"makespan {out['within_unit']['makespan_s']:.1f} -> {out['behind']['makespan_s']:.1f} s; same schedule "
          f"{out['same_schedule']}, same histories {out['same_histories']}")
    print(write_results("writes_behind", out))


if __name__ == "__main__":
    main()
