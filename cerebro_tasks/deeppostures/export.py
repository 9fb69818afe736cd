"""Export the best model of a run (or its top k, CHAP-style): `.keras`, a SavedModel, metadata.

Published atomically as `<export_dir>/<run_id>/` (built beside it, then renamed), then the
`<export_dir>/LATEST` pointer (a one-line file holding the run id; a file, not a symlink, so it
works on HDFS too) is replaced.

`model.keras` is the best model, uncompiled and built from Keras' own layers only: it loads with
plain `keras.saving.load_model` in a Python that never imported this package. With `top_k=k`
(odd, default 1) the k best models of the search (ranked in the run's `summary.json`, failed
models left out) are exported too, as `ensemble/<rank>-<model_id>.keras`; the prediction step then
writes their majority vote per window, like DeepPostures' published CHAP model (three models,
BiLSTM windows 9, 9 and 7 minutes). `metadata.json` says which models vote (`ensemble`).

Each export records `as_of`: the instant of the data it was trained on (a DAG run's data interval
end). LATEST only moves forward in that order, so a backfill of past dates that finishes after a
newer run leaves LATEST on the newer model; the model in force at an instant is the export with
the latest `as_of` not after it (:func:`model_in_force`).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from importlib import metadata as importlib_metadata
from typing import Any

from cerebro_tasks.deeppostures.arrivals import to_ns
from cerebro_tasks.storage.store import Store
from cerebro_tasks.storage import layout

LATEST = "LATEST"
_PACKAGES = ("cerebro-tasks", "tensorflow-cpu", "tensorflow", "keras", "pyspark", "petastorm", "pyarrow", "numpy",
             "h5py", "apache-airflow")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def data_manifest(prepared_url: str) -> dict[str, Any]:
    """What the model was trained on: the dataset and its version, and the subjects of each split."""
    prepared = Store(prepared_url)
    if not prepared.exists("split.json"):
        return {"prepared_url": prepared_url}
    split = prepared.read_json("split.json")
    return {
        "prepared_url": prepared_url,
        "dataset_url": split.get("dataset_url"),
        "dataset_version": split.get("key", {}).get("dataset_version"),
        "split_seed": split.get("key", {}).get("seed"),
        "subjects": {name: sorted(s for part in parts for s in part["subjects"])
                     for name, parts in split.get("partitions", {}).items()},
        "windows": {name: sum(part["windows"] for part in parts) for name, parts in split.get("partitions", {}).items()},
    }


ENSEMBLE_DIR = "ensemble"


def ranked_members(run: Store, result: dict[str, Any], top_k: int) -> list[dict[str, Any]]:
    """The k best models of a run, best first: ``{"model_id", "params", "value", "checkpoint"}``.

    The ranking is the run's ``summary.json`` (failed models left out); the best is the one
    ``result.json`` names, with its checkpoint. Another model's final checkpoint is the one after
    all its epochs (``epochs x workers`` train units); a missing one fails naming it.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1 or top_k % 2 == 0:
        raise ValueError(f"top_k: expected an odd integer >= 1 (a majority vote needs one), got {top_k!r}")
    members = [{"model_id": result["best_model_id"], "params": result["best_params"], "value": result["best_value"],
                "checkpoint": result["best_checkpoint"]}]
    if top_k == 1:
        return members
    summary = run.read_json(layout.SUMMARY_JSON)
    failed = set(summary.get("failed_models") or [])
    rows = [r for r in summary["models"] if r["model_id"] not in failed and r["model_id"] != result["best_model_id"]]
    if len(rows) + 1 < top_k:
        raise ValueError(f"top_k={top_k}: the run {run.url_of()} has {len(rows) + 1} usable models")
    for row in rows[: top_k - 1]:
        step = int(row["epochs"]) * int(summary["num_workers"])
        name = layout.checkpoint_name(row["model_id"], step)
        if not run.exists(*name):
            raise ValueError(f"{run.url_of(*name)}: expected the final checkpoint of {row['model_id']} "
                             f"(rank {row['rank']}), found none")
        members.append({"model_id": row["model_id"], "params": row["params"], "value": row.get(summary["metric"]),
                        "checkpoint": run.url_of(*name)})
    return members


def _load_for_export(checkpoint_url: str) -> Any:
    """A checkpoint without its training state: uncompiled, so the saved file names nothing of
    this package (the compiled checkpoint's metric is ours) and loads with plain Keras."""
    import keras

    from cerebro_tasks.deeppostures.workload import custom_objects

    folder, name = checkpoint_url.rsplit("/", 1)
    with Store(folder).local_copy(name) as path:
        return keras.saving.load_model(path, custom_objects=custom_objects(), compile=False)


def export_best(run_url: str, export_url: str, top_k: int = 1, as_of: str | None = None) -> dict[str, Any]:
    """Export the model named in `<run>/result.json` (and with `top_k` > 1 the next best, for a
    majority vote); returns the small summary (XCom).

    `as_of` (ISO-8601; default: now) is the instant of the data the run trained on; LATEST moves
    to this export only when no export with a later `as_of` holds it (`latest` in the summary).
    """
    run = Store(run_url)
    if not run.exists(layout.RESULT):
        # an unfinished (or failed) run has no result.json yet; a bare FileNotFoundError would not say so
        state = "is still running or was interrupted" if run.exists(layout.CONFIG) else "does not exist"
        raise ValueError(f"{run_url}: no {layout.RESULT}: the run {state}; export a run once its train "
                         "step has finished (resume it with the same run id)")
    result = run.read_json(layout.RESULT)
    config = run.read_json(layout.CONFIG)["config"]
    history = run.read_json(layout.HISTORY)
    members = ranked_members(run, result, top_k)
    models = [_load_for_export(m["checkpoint"]) for m in members]
    model = models[0]
    meta = {
        "run_id": result["run_id"],
        "model_id": result["best_model_id"],
        "params": result["best_params"],
        "metric": result["metric"],
        "value": result["best_value"],
        # which checkpoint: the model's last epoch (Cerebro's rule) or its best epoch by the metric
        "select": result.get("select", "last_epoch"),
        "epoch": result.get("best_epoch"),
        "checkpoint": result["best_checkpoint"],
        "history": history[result["best_model_id"]],
        "all_histories": history,
        "config": config,
        "data_manifest": data_manifest(config["prepared_url"]),
        "input_shape": list(model.input_shape),
        "output_shape": list(model.output_shape),
        "packages": package_versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ensemble": {
            "k": len(members),
            "vote": "majority per window; a window every member predicts; a tie goes to the best-ranked member",
            "members": [{"rank": i + 1, "model_id": m["model_id"], "params": m["params"], "value": m["value"],
                         "window_size": int(mdl.input_shape[1]),
                         "file": "model.keras" if len(members) == 1 else f"{ENSEMBLE_DIR}/{i + 1}-{m['model_id']}.keras"}
                        for i, (m, mdl) in enumerate(zip(members, models))],
        },
    }
    meta["as_of"] = as_of or meta["exported_at"]
    to_ns(meta["as_of"])  # a malformed instant fails here, before anything is published
    export = Store(export_url)
    with tempfile.TemporaryDirectory() as d:
        model.save(os.path.join(d, "model.keras"))
        if len(members) > 1:
            os.makedirs(os.path.join(d, ENSEMBLE_DIR))
            for member, mdl in zip(meta["ensemble"]["members"], models):
                mdl.save(os.path.join(d, member["file"]))
        model.export(os.path.join(d, "saved_model"), verbose=False)  # serving signature, no Python needed
        with open(os.path.join(d, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True, default=str)
        export.put_tree(d, result["run_id"])
    moved = move_latest(export_url, result["run_id"])
    return {"export_url": export.url_of(result["run_id"]), "model_id": meta["model_id"], "params": meta["params"],
            "metric": meta["metric"], "value": meta["value"], "as_of": meta["as_of"], "latest": moved,
            "ensemble": [m["model_id"] for m in meta["ensemble"]["members"]]}


def move_latest(export_url: str, run_id: str) -> bool:
    """Point LATEST at the export `run_id` unless it names one with a later `as_of`; True if moved."""
    export = Store(export_url)
    new = _export_as_of(export, run_id)
    if new is None:
        raise ValueError(f"{export.url_of(run_id)}: expected an export with metadata.json and its as_of")
    with export.lock(LATEST + ".lock", wait_s=60.0, poll_s=0.2):  # two runs exporting at once
        current = _export_as_of(export, export.read_bytes(LATEST).decode().strip()) if export.exists(LATEST) else None
        if current is not None and to_ns(current) > to_ns(new):
            return False
        export.write_bytes((run_id + "\n").encode(), LATEST)
        return True


def _export_as_of(export: Any, run_id: str) -> str | None:
    """An export's `as_of` (None when it has no metadata: then any new export supersedes it)."""
    if not export.exists(run_id, "metadata.json"):
        return None
    meta = export.read_json(run_id, "metadata.json")
    value = meta.get("as_of") or meta.get("exported_at")  # exports made before `as_of` existed
    try:
        to_ns(value)
    except (TypeError, ValueError):
        return None
    return value


def model_in_force(export_url: str, as_of: str) -> str | None:
    """The export a run whose data is as of `as_of` predicts with when it does not retrain: the one
    with the latest `as_of` not after it (ties: the later run id). None when there is none."""
    export = Store(export_url)
    limit = to_ns(as_of)
    best: tuple[int, str] | None = None
    for run_id in export.listdir():
        value = _export_as_of(export, run_id)
        if value is not None and to_ns(value) <= limit and (best is None or (to_ns(value), run_id) > best):
            best = (to_ns(value), run_id)
    return export.url_of(best[1]) if best else None


def latest_export(export_url: str) -> str:
    """The folder of the newest export (`<export>/<run_id>`), from the LATEST pointer."""
    export = Store(export_url)
    run_id = export.read_bytes(LATEST).decode().strip()
    return export.url_of(run_id)
