"""Cerebro's own quick-start script, changed only in its imports, runs here (examples/cerebro_quickstart.py)."""

from __future__ import annotations

import ast
import os
import runpy

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cerebro_quickstart.py")


def test_only_the_imports_name_this_project():
    tree = ast.parse(open(SCRIPT).read())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {n.module for n in imports if isinstance(n, ast.ImportFrom)} | {
        a.name for n in imports if isinstance(n, ast.Import) for a in n.names}
    assert "cerebro_tasks" in modules and not any(m.startswith("cerebro.") or m == "cerebro" for m in modules)
    # the rest of the script is Cerebro's: it never names this project outside its imports
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "cerebro_tasks" not in names


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The structure of `inputs`")  # Cerebro's predict([array]) on a one-input model
def test_cerebro_quickstart_script_runs(spark, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CEREBRO_QUICKSTART_DIR", str(tmp_path))
    g = runpy.run_path(SCRIPT, run_name="__main__")  # its SparkSession.builder...getOrCreate() gets the test session

    result, search = g["model"], g["model_selection"]
    assert type(search).__name__ == "TPESearch" and len(g["all_models"]) == 3 == len(g["all_models_keras"])
    assert set(g["all_model_training_history"]) == {"model_000", "model_001", "model_002"}
    assert g["model_history"] == result.get_history() and len(g["model_history"]["val_loss"]) == 1
    # TPE: two random proposals to fill both workers, the third made after the first model finished
    assert [seen for _, seen in search.proposals] == [0, 0, 1]
    assert search.proposer.num_observed == 3
    assert g["output_df"].columns[-1] == "label_predicted"
    assert "label_predicted" in capsys.readouterr().out  # output_df.select(...).show()
    assert g["pred"].shape == (1, 1)
    assert os.path.exists(tmp_path / "best_model.keras")
    run = result.run_url
    assert {"summary.json", "summary.md", "learning_curves.png", "tb"} <= set(os.listdir(run))
    assert sorted(os.listdir(os.path.join(run, "tb"))) == ["model_000", "model_001", "model_002"]
