"""The one search driver on the MOP driver with simulated workers (tests/support/sim_mop.py): early
stopping decisions, determinism, resume, failures, best-epoch selection; milliseconds, no Spark."""

from __future__ import annotations

import math

import pytest

from cerebro_tasks.errors import ConfigError
from cerebro_tasks.mop.workload import ModelSpec
from cerebro_tasks.search.driver import SearchDriver
from cerebro_tasks.search.searcher import make_searcher
from cerebro_tasks.storage import layout
from cerebro_tasks.storage.store import Store
from tests.support.sim_mop import DriverKilled, SimulatedMop

W = 2
EPOCHS = 9
SPACE = {"q": list(range(9))}


def loss(params: dict, epoch: int, kind: str) -> float:
    """Configuration q converges to 0.1 q: the lower q, the better, at every epoch."""
    return 0.1 * params["q"] + 1.0 / (epoch + 1) + (0.05 if kind == "train" else 0.0)


def new_model(index: int, params: dict) -> ModelSpec:
    return ModelSpec(f"m{index:03d}", params, EPOCHS, seed=index, cost=1.0 + 0.05 * params["q"])


def search(run_url: str, *, kind: str = "grid", early_stopping: dict | None = None, metric=loss, select="last_epoch",
           parallelism: int | None = None, num_models: int | None = None, **sim) -> tuple[SearchDriver, SimulatedMop]:
    mop = SimulatedMop(run_url, num_workers=W, metric=metric, seed=1, **sim)
    searcher = make_searcher(kind, SPACE if kind == "grid" else {"q": {"quniform": [0, 8, 1]}}, seed=3, mode="min",
                             num_models=num_models)
    driver = SearchDriver(mop, searcher, new_model=new_model, num_epochs=EPOCHS, metric_keys=["val_loss"], mode=None,
                          select=select, early_stopping=early_stopping, parallelism=parallelism)
    return driver, mop


def run(driver: SearchDriver, plots: bool = False) -> tuple[object, object]:
    driver.start()
    result = driver.run()
    return result, driver.finish(result, search="grid", run_id="r", wall_s=1.0, seed=3, plots=plots)


def unit_count(result) -> int:
    return len(result.records)


def test_asha_stops_most_of_a_grid_and_keeps_its_best(tmp_path):
    full, full_outcome = run(search(str(tmp_path / "full"))[0])
    driver, _ = search(str(tmp_path / "asha"), early_stopping={"kind": "asha", "reduction_factor": 3})
    result, outcome = run(driver, plots=True)
    assert full_outcome.best_model_id == outcome.best_model_id == "m000"
    assert unit_count(full) == 9 * EPOCHS * 2 * W
    assert unit_count(result) < unit_count(full) / 2.5
    stopped = outcome.summary["stopped_models"]
    assert 4 <= len(stopped) < 9 and "m000" not in stopped
    rows = {r["model_id"]: r for r in outcome.summary["models"]}
    for m in stopped:  # where and why, in the summary (a pass is revised until the next rung: later stops)
        assert rows[m]["stop_reason"].startswith("ASHA rung")
        assert 1 <= rows[m]["stopped_after_epoch"] <= rows[m]["epochs"] < EPOCHS
    state = Store(str(tmp_path / "asha")).read_json(layout.SEARCH_STATE)
    on_record = {d["model_id"] for d in state["decisions"] if d["stop"]}
    on_record |= {o["model_id"] for d in state["decisions"] for o in d["others"]}
    assert on_record == set(stopped)
    summary_md = Store(str(tmp_path / "asha")).read_bytes(layout.SUMMARY_MD).decode()
    assert "stopped after epoch" in summary_md and "tail utilisation" in summary_md
    assert 0 < outcome.summary["figures"]["tail_utilisation"] <= 1
    assert Store(str(tmp_path / "asha")).exists(layout.LEARNING_CURVES_PNG)
    from tensorboard.backend.event_processing import event_accumulator  # the Text tab says why

    acc = event_accumulator.EventAccumulator(str(tmp_path / "asha" / "tb" / stopped[0]))
    acc.Reload()
    assert [e.step for e in acc.Tensors("early_stopping")] == [rows[stopped[0]]["stopped_after_epoch"]]


def test_same_seed_same_decisions_and_schedule(tmp_path):
    traces = []
    for name in ("a", "b"):
        driver, _ = search(str(tmp_path / name), early_stopping={"kind": "hyperband"})
        result, _ = run(driver)
        traces.append(([(r["unit"], r["worker_id"]) for r in result.records],
                       Store(str(tmp_path / name)).read_json(layout.SEARCH_STATE)["decisions"]))
    assert traces[0] == traces[1]


@pytest.mark.parametrize("kill_after", [23, 61])
def test_a_resumed_run_restores_the_rule_and_decides_nothing_twice(tmp_path, kill_after):
    asked: list[tuple[str, int]] = []

    def counted(driver: SearchDriver) -> SearchDriver:
        on_result = driver.rule.on_result
        driver.rule.on_result = lambda m, e, v: (asked.append((m, e)), on_result(m, e, v))[1]
        return driver

    first, _ = search(str(tmp_path), early_stopping={"kind": "asha"}, kill_after=kill_after)
    with pytest.raises(DriverKilled):
        run(counted(first))
    decided_first = Store(str(tmp_path)).read_json(layout.SEARCH_STATE)["decisions"]
    assert 0 < len(asked) == len(decided_first)
    second, _ = search(str(tmp_path), early_stopping={"kind": "asha"})
    result, outcome = run(counted(second))
    decisions = Store(str(tmp_path)).read_json(layout.SEARCH_STATE)["decisions"]
    assert len(asked) == len(set(asked))  # no epoch judged twice over both attempts
    assert sorted(asked) == sorted((d["model_id"], d["epoch"]) for d in decisions)  # and every one on record
    assert decisions[:len(decided_first)] == decided_first  # the first attempt's decisions stand
    stopped_first = {d["model_id"] for d in decided_first if d["stop"]} | {o["model_id"] for d in decided_first
                                                                          for o in d["others"]}
    assert stopped_first <= set(outcome.summary["stopped_models"])
    for m in stopped_first:  # a model stopped before the crash trained no further epoch after the resume
        assert not any(d["model_id"] == m for d in decisions[len(decided_first):])
    assert outcome.best_model_id == "m000" and len(result.specs) == 9


def test_a_resumed_run_must_keep_its_early_stopping(tmp_path):
    first, _ = search(str(tmp_path), early_stopping={"kind": "asha"}, kill_after=30)
    with pytest.raises(DriverKilled):
        run(first)
    other, _ = search(str(tmp_path), early_stopping={"kind": "median"})
    with pytest.raises(ConfigError, match="early_stopping"):
        other.start()


def test_failed_models_are_reported_never_selected_and_reach_tpe_as_failures(tmp_path):
    bad: dict[str, float] = {}

    def metric(params, epoch, kind):  # the first configuration would be the best, but it fails in epoch 2
        return 0.0 if params["q"] == bad["q"] else loss(params, epoch, kind)

    driver, mop = search(str(tmp_path), kind="tpe", num_models=6, parallelism=W, metric=metric,
                         fail=lambda params, unit: params["q"] == bad["q"] and unit.epoch == 1)
    driver.start()
    bad["q"] = driver.searcher.proposed[0]["q"]
    result = driver.run()
    outcome = driver.finish(result, search="tpe", run_id="r", wall_s=1.0, seed=3, plots=False)
    failed = result.failed_models
    assert failed and all(result.specs[m].params["q"] == bad["q"] for m in failed)
    assert outcome.best_model_id not in failed and outcome.best_value > 0
    rows = {r["model_id"]: r for r in outcome.summary["models"]}
    assert rows[failed[0]]["error"].startswith("FloatingPointError")  # the exception, not "Traceback"
    assert "journal" in rows[failed[0]]["error_details"]
    observed = [v for p, v in driver.searcher.proposer.observations() if p["q"] == bad["q"]]
    assert observed and all(math.isnan(v) for v in observed)  # failures for TPE, not the (best) first epoch


def test_tpe_with_asha_keeps_w_models_in_flight_while_configurations_remain(tmp_path):
    driver, mop = search(str(tmp_path), kind="tpe", num_models=8, parallelism=1, early_stopping={"kind": "asha"})
    result, outcome = run(driver)
    assert len(result.specs) == 8 and driver.parallelism == W  # parallelism 1 raised to W with early stopping
    assert mop.in_flight_low[:8 - W] == [W] * (8 - W)
    assert outcome.summary["stopped_models"]


def test_best_epoch_selection_picks_the_epoch_before_overfitting(tmp_path):
    def overfits(params, epoch, kind):
        return 0.1 * params["q"] + (epoch - 3) ** 2 / 10 if kind == "val" else 1.0 / (epoch + 1)

    driver, _ = search(str(tmp_path / "best"), metric=overfits, select="best_epoch")
    _, outcome = run(driver)
    assert (outcome.best_model_id, outcome.best_epoch, outcome.best_step) == ("m000", 3, 4 * W)
    assert outcome.best_value == pytest.approx(0.0)
    assert outcome.summary["select"] == "best_epoch" and outcome.summary["best_epoch"] == 4
    driver, _ = search(str(tmp_path / "last"), metric=overfits)
    _, last = run(driver)
    assert (last.best_epoch, last.best_value) == (EPOCHS - 1, pytest.approx(2.5))


def test_the_direction_of_an_unknown_metric_must_be_given(tmp_path):
    mop = SimulatedMop(str(tmp_path), num_workers=W, metric=loss)
    searcher = make_searcher("grid", SPACE, seed=0, mode="min")
    with pytest.raises(ValueError, match="val_weirdness.*mode"):
        SearchDriver(mop, searcher, new_model=new_model, num_epochs=2, metric_keys=["val_weirdness"], mode=None)
    assert SearchDriver(mop, searcher, new_model=new_model, num_epochs=2, metric_keys=["val_weirdness"],
                        mode="max").mode == "max"


def test_when_every_model_fails_the_error_says_why(tmp_path):
    from cerebro_tasks.search.driver import SearchError

    driver, _ = search(str(tmp_path), fail=lambda params, unit: True)
    driver.start()
    result = driver.run()
    assert len(result.failed_models) == 9
    with pytest.raises(SearchError, match="every model failed .9 of 9 failed: FloatingPointError"):
        driver.finish(result, search="grid", run_id="r", wall_s=1.0, seed=3, plots=False)
