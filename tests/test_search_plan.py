"""Which models the DeepPostures job trains: stable ids and seeds, TPE proposing as results come in."""

from __future__ import annotations

from cerebro_tasks.config import TrainConfig
from cerebro_tasks.jobs.train import SearchPlan


def config(**search) -> TrainConfig:
    return TrainConfig.from_dict({"prepared_url": "/p", "store_url": "/s", "run_id": "r", "num_workers": 2,
                                  "search": {"space": {"learning_rate": {"loguniform": [-4, -2]}, "amp_factor": [1, 2]},
                                             "num_epochs": 1, **search}})


def test_grid_ids_and_seeds_are_stable_and_resume_continues_numbering():
    c = TrainConfig.from_dict({"prepared_url": "/p", "store_url": "/s", "run_id": "r",
                               "search": {"space": {"amp_factor": [1, 2, 4]}, "seed": 10}})
    specs = SearchPlan(c).initial({})
    assert [(s.model_id, s.params, s.seed) for s in specs] == [
        ("m000", {"amp_factor": 1}, 10), ("m001", {"amp_factor": 2}, 11), ("m002", {"amp_factor": 4}, 12)]
    resumed = SearchPlan(c).initial({s.model_id: s for s in specs[:2]})
    assert [(s.model_id, s.params) for s in resumed] == [("m002", {"amp_factor": 4})]
    # the lockstep clock times each model by its size: millions of parameters
    assert [round(s.cost, 1) for s in specs] == [1.7, 6.0, 22.5]


def test_random_search_is_reproducible():
    a = [s.params for s in SearchPlan(config(kind="random", num_models=5)).initial({})]
    b = [s.params for s in SearchPlan(config(kind="random", num_models=5)).initial({})]
    assert a == b and len({round(p["learning_rate"], 12) for p in a}) == 5


def test_tpe_keeps_parallelism_in_flight_and_proposes_until_num_models():
    plan = SearchPlan(config(kind="tpe", num_models=5, parallelism=2, metric="val_loss"))
    first = plan.initial({})
    assert [s.model_id for s in first] == ["m000", "m001"]
    more = plan.on_model_done("m000", first[0].params, {"val_loss": [0.5]}, in_flight=1)
    assert [s.model_id for s in more] == ["m002"]
    more += plan.on_model_done("m001", first[1].params, {"val_loss": [0.4]}, in_flight=1)
    more += plan.on_model_done("m002", more[0].params, {"val_loss": [0.3]}, in_flight=1)
    assert [s.model_id for s in more] == ["m002", "m003", "m004"] and plan.proposed == 5
    assert plan.on_model_done("m003", more[1].params, {"val_loss": [0.2]}, in_flight=1) == []  # num_models reached
    assert plan.tpe.num_observed == 4


def test_tpe_resumed_run_does_not_exceed_parallelism():
    """Replaying finished models after a driver restart must not flood the workers."""
    plan = SearchPlan(config(kind="tpe", num_models=6, parallelism=2, metric="val_loss"))
    first = plan.initial({})
    # both models still in flight: nothing to add when the first one's result is replayed
    assert plan.on_model_done("m000", first[0].params, {"val_loss": [0.5]}, in_flight=2) == []
    assert len(plan.on_model_done("m001", first[1].params, {"val_loss": [0.4]}, in_flight=0)) == 2


def test_a_resumed_run_must_keep_its_configuration(tmp_path):
    import pytest

    from cerebro_tasks.config import ConfigError
    from cerebro_tasks.jobs.train import check_same_run, config_dict
    from cerebro_tasks.storage.store import Store

    c = config(kind="random", num_models=2)
    run = Store(str(tmp_path))
    run.write_json({"config": config_dict(c)}, "config.json")
    check_same_run(run, c)  # the same configuration resumes
    other = config(kind="random", num_models=3)
    with pytest.raises(ConfigError, match="search"):
        check_same_run(run, other)


def test_a_resumed_run_must_keep_its_data(tmp_path):
    import pytest

    from cerebro_tasks.config import ConfigError
    from cerebro_tasks.jobs.train import check_same_run, config_dict
    from cerebro_tasks.storage.store import Store

    c = config(kind="random", num_models=2)
    run = Store(str(tmp_path))
    run.write_json({"config": config_dict(c), "data": {"dataset_version": "v1", "seed": 1}}, "config.json")
    check_same_run(run, c, {"dataset_version": "v1", "seed": 1})
    with pytest.raises(ConfigError, match="another split"):
        check_same_run(run, c, {"dataset_version": "v2", "seed": 1})
