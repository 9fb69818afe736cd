"""Which models the DeepPostures job trains: stable ids and seeds, the one driver's settings, resume checks."""

from __future__ import annotations

import pytest

from cerebro_tasks.config import ConfigError, TrainConfig
from cerebro_tasks.jobs.train import config_dict, model_spec, search_driver
from cerebro_tasks.search.driver import check_same_run
from cerebro_tasks.search.searcher import make_searcher
from cerebro_tasks.storage.store import Store
from tests.support.sim_mop import SimulatedMop


def config(**search) -> TrainConfig:
    return TrainConfig.from_dict({"prepared_url": "/p", "store_url": "/s", "run_id": "r", "num_workers": 2,
                                  "search": {"space": {"learning_rate": {"loguniform": [-4, -2]}, "amp_factor": [1, 2]},
                                             "num_epochs": 1, **search}})


def test_grid_ids_and_seeds_are_stable():
    c = TrainConfig.from_dict({"prepared_url": "/p", "store_url": "/s", "run_id": "r",
                               "search": {"space": {"amp_factor": [1, 2, 4]}, "seed": 10}})
    configs = make_searcher("grid", c.search.space, seed=10, mode="min").propose(10)
    specs = [model_spec(c, i, p) for i, p in enumerate(configs)]
    assert [(s.model_id, s.params, s.seed) for s in specs] == [
        ("m000", {"amp_factor": 1}, 10), ("m001", {"amp_factor": 2}, 11), ("m002", {"amp_factor": 4}, 12)]
    # the lockstep clock times each model by its size: millions of parameters
    assert [round(s.cost, 1) for s in specs] == [1.7, 6.0, 22.5]


def test_random_search_is_reproducible():
    space = config(kind="random", num_models=5).search.space
    a = make_searcher("random", space, seed=5, mode="min", num_models=5).propose(5)
    b = make_searcher("random", space, seed=5, mode="min", num_models=5).propose(5)
    assert a == b and len({round(p["learning_rate"], 12) for p in a}) == 5


def test_the_job_sets_the_driver_up_from_the_configuration(tmp_path):
    c = config(kind="tpe", num_models=5, metric="val_balanced_accuracy", select="best_epoch",
               early_stopping={"kind": "asha", "reduction_factor": 2})
    driver = search_driver(c, SimulatedMop(str(tmp_path), num_workers=2, metric=lambda p, e, k: 0.0))
    assert (driver.mode, driver.select, driver.parallelism, driver.searcher.total) == ("max", "best_epoch", 2, 5)
    assert driver.rule is not None and driver.rule.reduction_factor == 2
    assert search_driver(config(kind="random", num_models=3), SimulatedMop(str(tmp_path), num_workers=2, metric=lambda p, e, k: 0.0)
                         ).parallelism is None  # grid and random: every configuration at once


def test_a_resumed_run_must_keep_its_configuration(tmp_path):
    c = config(kind="random", num_models=2)
    run = Store(str(tmp_path))
    check_same_run(run, config_dict(c))  # the first attempt records it
    check_same_run(run, config_dict(c))  # the same configuration resumes
    with pytest.raises(ConfigError, match="search"):
        check_same_run(run, config_dict(config(kind="random", num_models=3)))


def test_a_resumed_run_must_keep_its_data(tmp_path):
    c = config(kind="random", num_models=2)
    run = Store(str(tmp_path))
    check_same_run(run, config_dict(c), {"dataset_version": "v1", "seed": 1})
    check_same_run(run, config_dict(c), {"dataset_version": "v1", "seed": 1})
    with pytest.raises(ConfigError, match="another split"):
        check_same_run(run, config_dict(c), {"dataset_version": "v2", "seed": 1})
