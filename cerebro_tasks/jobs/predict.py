"""The prediction Spark job: one task per group of subjects, CHAP CSVs plus a Parquet copy.

Each task loads the exported model once, reads its subjects' windows from the dataset (only their
rows: the dataset is ordered by subject), predicts in batches and writes, atomically,
`<predictions>/<model_name>/<subject>.csv` and `<predictions>/<model_name>/parquet/subject=<id>/part-0.parquet`
(a Hive-partitioned Parquet dataset, so a backfill that predicts new subjects just adds folders).

An export made with `top_k` > 1 predicts by the majority vote of its models (its metadata's
`ensemble`), each with its own BiLSTM window. Timestamps are printed in the study's time zone and
classes named by its label map, both recorded in the dataset at conversion (the label map can be
overridden, as DeepPostures' `--activpal-label-map` names the classes).
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger("cerebro_tasks.predict")


def member_files(model_url: str) -> list[str]:
    """The model files of an export that vote, best first (just `model.keras` for one model)."""
    from cerebro_tasks.storage.store import Store

    folder = Store(model_url)
    meta = folder.read_json("metadata.json") if folder.exists("metadata.json") else {}
    return [m["file"] for m in meta.get("ensemble", {}).get("members", [])] or ["model.keras"]


def _load_models(model_url: str) -> list[Any]:
    import keras

    from cerebro_tasks.storage.store import Store

    folder = Store(model_url)
    models = []
    for name in member_files(model_url):
        with folder.local_copy(*name.split("/")) as path:  # plain Keras: an export needs nothing of ours
            models.append(keras.saving.load_model(path, compile=False))
    return models


def predict_partition(subjects: Iterable[str], *, dataset_url: str, model_url: str, out_url: str, padding: str,
                      include_label: bool, batch_size: int, include_segment: bool = True,
                      label_map: dict[str, int] | None = None, timezone: str = "UTC",
                      as_of_ns: int | None = None) -> Iterator[dict[str, Any]]:
    """Predict a group of subjects inside one Spark task; yields one summary row per subject."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cerebro_tasks.deeppostures.chap import csv_bytes, predict_subject_ensemble
    from cerebro_tasks.deeppostures.classes import class_names
    from cerebro_tasks.deeppostures.petastorm_io import read_windows
    from cerebro_tasks.storage.store import Store

    subjects = list(subjects)
    if not subjects:
        return
    _pin_devices()
    members = [(fixed_batch(m.predict_on_batch, batch_size), int(m.input_shape[1])) for m in _load_models(model_url)]
    names = class_names(label_map)
    out = Store(out_url)
    for subject in subjects:
        started = time.time()
        table = read_windows(dataset_url, subjects=[subject], as_of_ns=as_of_ns)
        df = predict_subject_ensemble(table, members, padding=padding, include_label=include_label,
                                      include_segment=include_segment, batch_size=batch_size, timezone=timezone,
                                      label_map=names)
        out.write_bytes(csv_bytes(df), f"{subject}.csv")
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
        out.write_bytes(buf.getvalue(), "parquet", f"subject={subject}", "part-0.parquet")
        per_class = {name: int((df["prediction"] == name).sum()) for i, name in names.items() if i >= 0}
        yield {"subject": subject, "windows": int(len(table["time"])), "predicted": int(len(df)),
               "per_class": per_class, "seconds": round(time.time() - started, 3)}


def _pin_devices() -> None:
    """Like a MOP worker: this task's GPU if Spark gave it one, else TensorFlow threads = its cores
    (two tasks each using every core of the machine slow each other down)."""
    from pyspark import TaskContext

    from cerebro_tasks.mop.worker import configure_devices

    ctx = TaskContext.get()
    if ctx is None:
        return
    gpus = ctx.resources().get("gpu")
    configure_devices(list(gpus.addresses) if gpus is not None else [], ctx.cpus())


def fixed_batch(predict_on_batch: Any, batch_size: int) -> Any:
    """Always call the model with `batch_size` rows (zero-padded), so TensorFlow traces it once.

    Every subject's last batch is smaller than the others; each new shape would cost a retrace
    (about as long as predicting thousands of windows).
    """
    import numpy as np

    def predict(x: Any) -> Any:
        n = len(x)
        if n == batch_size:
            return predict_on_batch(x)
        padded = np.zeros((batch_size, *x.shape[1:]), dtype=x.dtype)
        padded[:n] = x
        return np.asarray(predict_on_batch(padded))[:n]

    return predict


def _check_classes(model_url: str, label_map: dict[str, int]) -> None:
    """Fail before any Spark job when the label map does not name every output of the model."""
    from cerebro_tasks.storage.store import Store

    folder = Store(model_url)
    if not folder.exists("metadata.json"):
        return
    outputs = folder.read_json("metadata.json").get("output_shape", [None])[-1]
    if outputs is not None and int(outputs) != len(label_map):
        raise ValueError(f"label map {label_map} names {len(label_map)} classes, the model in {model_url} "
                         f"outputs {outputs}")


def list_subjects(dataset_url: str, as_of_ns: int | None = None) -> list[str]:
    """Subject ids present in the windows dataset (a Parquet read of one column), as of an instant."""
    from cerebro_tasks.deeppostures.petastorm_io import read_windows

    ids = read_windows(dataset_url, columns=["id"], as_of_ns=as_of_ns)["id"]
    return sorted({str(s) for s in ids})


LEDGER = "_predicted_subjects.json"
# a model name is one folder under the predictions root: no separators, no '..', no hidden names
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_inputs(model_url: str, model_name: str) -> None:
    """What predict needs before any Spark job: an export folder holding model.keras, and a model
    name that stays inside the predictions folder. Raises ValueError naming the problem."""
    from cerebro_tasks.storage.store import Store

    if not _MODEL_NAME.match(model_name) or ".." in model_name:
        raise ValueError(f"model name {model_name!r}: expected letters, digits and _.- (one folder inside the "
                         "predictions folder)")
    if not Store(model_url).exists("model.keras"):
        raise ValueError(f"{model_url}: no model.keras here; expected an export folder (cerebro-tasks export "
                         "writes <export_dir>/<run_id>/model.keras)")


def predict(spark: Any, *, dataset_url: str, model_url: str, predictions_url: str, model_name: str,
            subjects: list[str] | None = None, only_new: bool = False, padding: str = "drop",
            include_label: bool = False, batch_size: int = 256, include_segment: bool = True,
            label_map: dict[str, int] | str | None = None, as_of_ns: int | None = None,
            arrived_since_ns: int | None = None) -> dict[str, Any]:
    """Write CHAP predictions for `subjects` (default: every subject in the dataset).

    With `only_new`, subjects already predicted by an earlier run (the ledger
    `<predictions>/_predicted_subjects.json`) are skipped: a manual or Asset-triggered run
    predicts the subjects that arrived since, whichever DAG converted them. With `as_of_ns`, the
    dataset as it was then (files that had arrived before it); with `arrived_since_ns` too, the
    subjects with a file arriving in [arrived_since_ns, as_of_ns): what a scheduled or backfill
    run for that interval predicts (`cerebro_tasks.deeppostures.arrivals`). `include_segment=False`
    leaves the segment column out (DeepPostures' `--no-segment`); `label_map` names the classes
    (default: the dataset's); it must have as many classes as the model has outputs.
    """
    from cerebro_tasks.deeppostures.arrivals import arrived_subjects, manifest_files
    from cerebro_tasks.deeppostures.classes import check_label_map
    from cerebro_tasks.deeppostures.convert import dataset_study
    from cerebro_tasks.deeppostures.sequences import PADDING_MODES
    from cerebro_tasks.storage.store import Store

    if padding not in PADDING_MODES:
        raise ValueError(f"padding: expected one of {PADDING_MODES}, got {padding!r}")
    check_inputs(model_url, model_name)
    study = dataset_study(dataset_url)
    label_map = check_label_map(study["label_map"] if label_map is None else label_map)
    _check_classes(model_url, label_map)
    started = time.time()
    root = Store(predictions_url)
    ledger = root.read_json(LEDGER) if root.exists(LEDGER) else {"subjects": {}}
    present = list_subjects(dataset_url, as_of_ns)
    if arrived_since_ns is not None:
        if as_of_ns is None:
            raise ValueError("arrived_since_ns: needs as_of_ns, the end of the interval")
        arrived = arrived_subjects(manifest_files(dataset_url), arrived_since_ns, as_of_ns)
        subjects = sorted(set(subjects) & set(arrived)) if subjects is not None else arrived
    if subjects is not None:
        unknown = sorted(set(subjects) - set(present))
        if unknown:
            raise ValueError(f"{dataset_url}: no windows of subject(s) {unknown[:10]}; the dataset holds {len(present)} "
                             f"subjects, e.g. {present[:5]}")
    subjects = sorted(subjects) if subjects is not None else present
    skipped = [s for s in subjects if s in ledger["subjects"]] if only_new else []
    subjects = [s for s in subjects if s not in ledger["subjects"]] if only_new else subjects
    out_url = Store(predictions_url).url_of(model_name)
    rows: list[dict[str, Any]] = []
    if subjects:
        sc = spark.sparkContext
        sc.setJobDescription(f"CHAP predictions for {len(subjects)} subjects")
        slices = max(1, min(len(subjects), sc.defaultParallelism))
        rows = (sc.parallelize(subjects, slices)
                .mapPartitions(lambda it: predict_partition(it, dataset_url=dataset_url, model_url=model_url,
                                                            out_url=out_url, padding=padding,
                                                            include_label=include_label, batch_size=batch_size,
                                                            include_segment=include_segment, label_map=label_map,
                                                            timezone=study["timezone"], as_of_ns=as_of_ns))
                .collect())
    seconds = time.time() - started
    predicted = sum(r["predicted"] for r in rows)
    if rows:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ledger["subjects"].update({r["subject"]: {"model": model_name, "at": stamp} for r in rows})
        root.write_json(ledger, LEDGER)
    summary = {"predictions_url": out_url, "model_name": model_name, "subjects": len(rows),
               "models_voting": len(member_files(model_url)), "timezone": study["timezone"],
               "classes": list(label_map),
               "skipped_already_predicted": len(skipped),
               "windows_predicted": predicted, "seconds": round(seconds, 2),
               "windows_per_second": round(predicted / seconds, 1) if seconds > 0 else None}
    # the per-subject detail stays beside the files; only the totals travel on (XCom stays small)
    Store(out_url).write_json({**summary, "per_subject": rows}, "_summary.json")
    log.info("predicted %d windows of %d subjects in %.1f s -> %s", predicted, len(rows), seconds, out_url)
    return summary
