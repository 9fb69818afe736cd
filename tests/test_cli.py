"""The README's by-hand commands, in order, in a fresh folder: every step runs without Airflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def cli(*args: str, cwd: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, "-m", "cerebro_tasks.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_readme_commands_by_hand(tmp_path):
    d = str(tmp_path)
    config = json.load(open(os.path.join(ROOT, "examples", "train_config.json")))
    config["search"]["num_epochs"] = 1
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    cli("synth", "--out", "h5", "--subjects", "4", "--days", "2", "--windows-per-day", "360", "--seed", "7", cwd=d)
    converted = json.loads(cli("convert", "--input", "h5", "--output", "dataset", cwd=d).stdout)
    assert converted["files"]["converted"] == 8 and converted["subjects"] == 4
    cli("split", "--dataset", "dataset", "--output", "prepared", "--workers", "2", "--val-fraction", "0.5", cwd=d)
    trained = json.loads(cli("train", "--config", "config.json", cwd=d).stdout)
    assert trained["models"] == 2 and trained["best_model_id"] in ("m000", "m001")
    run = f"store/runs/{config['run_id']}"
    exported = json.loads(cli("export", "--run", run, "--output", "exports", cwd=d).stdout)
    assert exported["model_id"] == trained["best_model_id"]
    model = f"exports/{config['run_id']}"
    predicted = json.loads(cli("predict", "--dataset", "dataset", "--model", model, "--predictions", "predictions",
                               "--model-name", "best", cwd=d).stdout)
    assert predicted["subjects"] == 4 and predicted["windows_predicted"] > 0
    assert sorted(os.listdir(os.path.join(d, "predictions", "best")))[:2] == ["S0001.csv", "S0002.csv"]


def test_bad_input_is_one_clear_line(tmp_path):
    shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "examples")
    proc = cli("convert", "--input", "no-such-folder", "--output", "dataset", cwd=str(tmp_path), ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("cerebro-tasks convert: error: ")
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prepared_url": "p", "store_url": "s", "run_id": "r",
                               "search": {"space": {"window_minutes": [3.05]}}}))
    proc = cli("train", "--config", str(bad), cwd=str(tmp_path), ok=False)
    assert proc.returncode == 2 and "window_minutes" in proc.stderr and "Traceback" not in proc.stderr


def test_train_predict_and_export_refuse_before_anything_is_written(tmp_path):
    """Each a single line, before a Spark session or any file of the run exists."""
    d = str(tmp_path)
    base = {"prepared_url": "prepared", "store_url": "store", "run_id": "r1", "num_workers": 2,
            "search": {"space": {"learning_rate": [1e-3]}, "num_epochs": 1}}

    def fails(*args: str, says: str) -> None:
        proc = cli(*args, cwd=d, ok=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"cerebro-tasks {args[0]}: error: ") and says in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "Setting default log level" not in proc.stderr  # no Spark

    fails("train", "--config", json.dumps(base), says="no prepared split here")
    os.makedirs(os.path.join(d, "prepared"))
    with open(os.path.join(d, "prepared", "split.json"), "w") as f:
        json.dump({"workers": 3}, f)
    fails("train", "--config", json.dumps(base), says="has 3 partitions per split, the run asks for 2 workers")
    assert not os.path.exists(os.path.join(d, "store"))  # no config.json claims the run id
    fails("export", "--run", "store/runs/r1", "--output", "exports", says="the run does not exist")
    os.makedirs(os.path.join(d, "store", "runs", "r1"))
    with open(os.path.join(d, "store", "runs", "r1", "config.json"), "w") as f:
        f.write("{}")
    fails("export", "--run", "store/runs/r1", "--output", "exports", says="is still running or was interrupted")
    fails("predict", "--dataset", "dataset", "--model", "exports/r1", "--predictions", "predictions",
          "--model-name", "best", says="no model.keras here")
    os.makedirs(os.path.join(d, "exports", "r1"))
    with open(os.path.join(d, "exports", "r1", "model.keras"), "wb") as f:
        f.write(b"not read: the name is refused first")
    fails("predict", "--dataset", "dataset", "--model", "exports/r1", "--predictions", "predictions",
          "--model-name", "../outside", says="model name '../outside'")
    assert not os.path.exists(os.path.join(d, "outside")) and not os.path.exists(os.path.join(d, "predictions"))
