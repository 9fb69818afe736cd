"""Export the best model of a run: `.keras`, a TensorFlow SavedModel for serving, and metadata.

Published atomically as `<export_dir>/<run_id>/` (built beside it, then renamed), then the
`<export_dir>/LATEST` pointer (a one-line file holding the run id; a file, not a symlink, so it
works on HDFS too) is replaced.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from importlib import metadata as importlib_metadata
from typing import Any

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


def export_best(run_url: str, export_url: str) -> dict[str, Any]:
    """Export the model named in `<run>/result.json`; returns the small summary (XCom)."""
    run = Store(run_url)
    if not run.exists(layout.RESULT):
        # an unfinished (or failed) run has no result.json yet; a bare FileNotFoundError would not say so
        state = "is still running or was interrupted" if run.exists(layout.CONFIG) else "does not exist"
        raise ValueError(f"{run_url}: no {layout.RESULT}: the run {state}; export a run once its train "
                         "step has finished (resume it with the same run id)")
    import keras

    from cerebro_tasks.deeppostures.workload import custom_objects

    result = run.read_json(layout.RESULT)
    config = run.read_json(layout.CONFIG)["config"]
    history = run.read_json(layout.HISTORY)
    ckpt = Store(result["best_checkpoint"].rsplit("/", 1)[0])
    with ckpt.local_copy(result["best_checkpoint"].rsplit("/", 1)[1]) as path:
        model = keras.saving.load_model(path, custom_objects=custom_objects())
    meta = {
        "run_id": result["run_id"],
        "model_id": result["best_model_id"],
        "params": result["best_params"],
        "metric": result["metric"],
        "value": result["best_value"],
        "history": history[result["best_model_id"]],
        "all_histories": history,
        "config": config,
        "data_manifest": data_manifest(config["prepared_url"]),
        "input_shape": list(model.input_shape),
        "output_shape": list(model.output_shape),
        "packages": package_versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    export = Store(export_url)
    with tempfile.TemporaryDirectory() as d:
        model.save(os.path.join(d, "model.keras"))
        model.export(os.path.join(d, "saved_model"), verbose=False)  # serving signature, no Python needed
        with open(os.path.join(d, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True, default=str)
        export.put_tree(d, result["run_id"])
    export.write_bytes((result["run_id"] + "\n").encode(), LATEST)
    return {"export_url": export.url_of(result["run_id"]), "model_id": meta["model_id"], "params": meta["params"],
            "metric": meta["metric"], "value": meta["value"]}


def latest_export(export_url: str) -> str:
    """The folder of the newest export (`<export>/<run_id>`), from the LATEST pointer."""
    export = Store(export_url)
    run_id = export.read_bytes(LATEST).decode().strip()
    return export.url_of(run_id)
