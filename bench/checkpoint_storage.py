"""Bounded storage: bytes a search leaves in its run store, against one checkpoint per model.

Runs the same search (synthetic workload, models large enough that a checkpoint dwarfs the
journal) with ``keep_checkpoints="needed"`` and the selection metric, and with ``"all"``, and
reports for each: bytes in the run folder at the end / (models x the size of one checkpoint).
The goal of issue 11 is <= 3 for the default. Writes bench/results/checkpoint_storage.json.

    python bench/checkpoint_storage.py [--models 4] [--epochs 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _common import ROOT, write_results  # bench/ is this script's folder, first on sys.path

sys.path.insert(0, ROOT)

from cerebro_tasks.mop.runtime import run_mop  # noqa: E402
from cerebro_tasks.mop.synthetic_workload import SyntheticWorkload  # noqa: E402
from cerebro_tasks.mop.workload import ModelSpec  # noqa: E402
from cerebro_tasks.spark_session import get_spark  # noqa: E402
from cerebro_tasks.storage import layout  # noqa: E402


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512, help="hidden units (sets the checkpoint size)")
    args = parser.parse_args()
    workload = SyntheticWorkload(rows_per_partition=1024, features=256, batch_size=128)
    specs = [ModelSpec(f"m{i}", {"lr": lr, "hidden": args.hidden}, args.epochs, seed=i)
             for i, lr in enumerate([3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4][: args.models])]
    spark = get_spark("bench-checkpoint-storage", master=f"local[{args.workers}]",
                      conf={"spark.ui.enabled": "false"})
    figures: dict = {"models": args.models, "epochs": args.epochs, "workers": args.workers}
    with tempfile.TemporaryDirectory() as d:
        for keep in ("needed", "all"):
            run_url = os.path.join(d, keep)
            started = time.time()
            result = run_mop(spark, workload, specs, run_url, num_workers=args.workers, seed=0,
                             keep_checkpoints=keep, select=("val_loss", "min"))
            final = os.path.getsize(os.path.join(run_url, *layout.checkpoint_name("m0", args.epochs * args.workers)))
            total = folder_bytes(run_url)
            figures[keep] = {
                "checkpoint_bytes": final,
                "run_bytes": total,
                "models_bytes": folder_bytes(os.path.join(run_url, layout.MODELS_DIR)),
                "ratio": round(total / (len(specs) * final), 2),
                "checkpoints_left": sum(len(os.listdir(os.path.join(run_url, layout.MODELS_DIR, m))) for m in result.specs),
                "seconds": round(time.time() - started, 1),
            }
            print(keep, figures[keep], flush=True)
    spark.stop()
    print("wrote", write_results("checkpoint_storage", figures))


if __name__ == "__main__":
    main()
