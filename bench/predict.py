"""CHAP prediction job throughput against `model.predict` on in-memory arrays (goal >= 0.5).

The job's figure includes everything a user waits for: Spark tasks, loading the model, reading
each subject's windows from the dataset, building sequences, predicting, writing the CSV and the
Parquet copy. The ceiling is the bare `model.predict` of the same sequences, already in memory,
with the whole machine. Writes bench/results/predict.json.

    python bench/predict.py [--subjects 8] [--days 2] [--windows-per-day 8640]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _common import ROOT, converted_study, write_results  # bench/ is this script's folder, first on sys.path

sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--windows-per-day", type=int, default=8640, help="8640 = full days, as in real studies")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np

    from cerebro_tasks.deeppostures.petastorm_io import read_windows
    from cerebro_tasks.deeppostures.sequences import build_prediction_sequences
    from cerebro_tasks.deeppostures.workload import build_model
    from cerebro_tasks.jobs.predict import predict
    from cerebro_tasks.spark_session import get_spark

    params = {"amp_factor": 0.25, "window_minutes": 3, "learning_rate": 1e-3}
    with tempfile.TemporaryDirectory() as d:
        spark = get_spark("bench-predict")
        converted_study(d, subjects=args.subjects, days=args.days, windows_per_day=args.windows_per_day, spark=spark)
        model = build_model(params, seed=1)
        os.makedirs(f"{d}/model")
        model.save(f"{d}/model/model.keras")

        job = []
        for i in range(args.repeats):
            r = predict(spark, dataset_url=f"{d}/dataset", model_url=f"{d}/model", predictions_url=f"{d}/pred{i}",
                        model_name="bench")
            job.append(r["windows_predicted"] / r["seconds"])
        windows_predicted = r["windows_predicted"]
        spark.stop()

        table = read_windows(f"{d}/dataset")
        t = int(model.input_shape[1])
        xs = []
        for subject in np.unique(table["id"]):
            rows = table["id"] == subject
            x, _ = build_prediction_sequences({k: v[rows] for k, v in table.items()}, t, "drop")
            xs.append(x)
        x = np.concatenate(xs)
        model.predict(x[:256], batch_size=256, verbose=0)  # warm-up: graph tracing is not throughput
        ceiling = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            model.predict(x, batch_size=256, verbose=0)
            ceiling.append(x.shape[0] * t / (time.perf_counter() - started))

    figures = {
        "subjects": args.subjects, "windows_predicted": windows_predicted,
        "job_windows_per_s": [round(v, 1) for v in job], "ceiling_windows_per_s": [round(v, 1) for v in ceiling],
        "job_median": round(statistics.median(job), 1), "ceiling_median": round(statistics.median(ceiling), 1),
        "ratio": round(statistics.median(job) / statistics.median(ceiling), 3), "goal": 0.5,
        "model": params,
    }
    write_results("predict", figures)
    print(f"prediction job: {figures['job_median']:.0f} windows/s (median of {args.repeats}), "
          f"model.predict in memory: {figures['ceiling_median']:.0f} windows/s -> ratio {figures['ratio']:.2f} "
          f"(goal >= 0.5); {windows_predicted} windows of {args.subjects} subjects")


if __name__ == "__main__":
    main()
