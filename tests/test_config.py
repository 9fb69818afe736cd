"""Run configuration, search spaces and model selection: validated once, errors name the field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cerebro_tasks.config import ConfigError, TrainConfig
from cerebro_tasks.search.selection import best_model, metric_mode, rank
from cerebro_tasks.search.space import grid, hp_choice, hp_loguniform, hp_uniform, parse_space, sample

BASE = {"prepared_url": "/p", "store_url": "/s", "run_id": "r1", "num_workers": 2,
        "search": {"space": {"learning_rate": [1e-3, 1e-4], "amp_factor": [1, 2]}, "num_epochs": 2}}


def test_round_trip_json():
    c = TrainConfig.from_dict(BASE)
    again = TrainConfig.from_json(c.to_json())
    assert again == c
    assert c.run_url == "/s/runs/r1"


@pytest.mark.parametrize("patch, field", [
    ({"num_workers": 0}, "num_workers"),
    ({"run_id": "../escape"}, "run_id"),
    ({"batch_size": "16"}, "batch_size"),
    ({"search": {"space": {"lr": []}, "num_epochs": 1}}, "search.space"),
    ({"search": {"space": {"lr": [1]}, "num_epochs": 0}}, "search.num_epochs"),
    ({"search": {"space": {"lr": [1]}, "num_epochs": True}}, "search.num_epochs"),  # JSON true is not 1
    ({"num_workers": True}, "num_workers"),
    ({"keep_checkpoints": "some"}, "keep_checkpoints"),
    ({"search": {"space": {"lr": [1]}, "kind": "bayes"}}, "search.kind"),
    ({"search": {"space": {"lr": [1]}, "kind": "random"}}, "search.num_models"),
    ({"search": {"space": {"lr": [1]}, "metric": "loss"}}, "search.metric"),
    ({"search": {"space": {"lr": {"loguniform": [-2, -4]}}}}, "search.space"),
    ({"model_cache_mb": -1}, "model_cache_mb"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_config_names_the_field(patch, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainConfig.from_dict({**BASE, **patch})


def test_bad_json_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json("{nope")


def test_grid_is_every_combination_in_stable_order():
    space = parse_space({"a": [1, 2], "b": ["x", "y", "z"]})
    configs = grid(space)
    assert len(configs) == 6
    assert configs[0] == {"a": 1, "b": "x"} and configs[-1] == {"a": 2, "b": "z"}
    with pytest.raises(ValueError, match="'c'"):
        grid(parse_space({"c": {"uniform": [0, 1]}}))


def test_sampling_is_seeded_and_identical_dimensions_draw_differently():
    space = parse_space({"lr": hp_loguniform(-4, -2), "l2": hp_loguniform(-4, -2), "amp": hp_choice([1, 2, 4])})
    a = sample(space, 20, np.random.default_rng(5))
    b = sample(space, 20, np.random.default_rng(5))
    assert a == b
    assert any(c["lr"] != c["l2"] for c in a)  # Cerebro's helpers drew one shared sequence
    assert all(1e-4 <= c["lr"] <= 1e-2 for c in a)  # base-10 exponents, as in Cerebro


def test_space_json_forms():
    space = parse_space({"lr": {"loguniform": [-3, -1]}, "n": {"quniform": [1, 9, 2]}, "fixed": 3,
                         "u": hp_uniform(0, 1)})
    assert space["fixed"].kind == "choice"
    vals = sample(space, 50, np.random.default_rng(0))
    assert all(isinstance(v["n"], int) and v["n"] % 2 == 0 for v in vals)
    assert json.loads(json.dumps({k: d.to_json() for k, d in space.items()}))


def test_selection_direction_follows_the_metric():
    h = {"a": {"val_loss": [0.9, 0.5], "val_accuracy": [0.6, 0.7]},
         "b": {"val_loss": [0.8, 0.6], "val_accuracy": [0.7, 0.9]},
         "c": {"val_loss": [math.nan], "val_accuracy": [math.nan]}}
    assert metric_mode("val_loss") == "min"
    assert metric_mode("val_accuracy") == metric_mode("val_balanced_accuracy") == metric_mode("val_auc") == "max"
    assert best_model(h, "val_loss") == "a"
    assert best_model(h, "val_accuracy") == "b"  # Cerebro picked the lowest accuracy here
    assert [m for m, _ in rank(h, "val_accuracy")] == ["b", "a", "c"]  # NaN last
    with pytest.raises(ValueError, match="val_auc"):
        best_model(h, "val_auc")


@pytest.mark.parametrize("dim, bad", [
    ({"uniform": [3, 9]}, "continuous range"),  # both ends are whole windows, 3.05 is not
    ({"loguniform": [0.5, 0.9]}, "continuous range"),
    ({"quniform": [3, 9, 0.25]}, "window_minutes 3.25"),  # 3 and 9 are fine, 3.25 min is 19.5 windows
    ({"quniform": [0.01, 1, 0.5]}, "window_minutes 0"),  # rounds down to 0 minutes
])
def test_window_minutes_is_checked_over_the_whole_range(dim, bad):
    from cerebro_tasks.deeppostures.workload import check_search

    with pytest.raises(ConfigError, match=bad):
        check_search({"window_minutes": dim}, "val_loss")


def test_window_minutes_ranges_of_whole_windows_pass():
    from cerebro_tasks.deeppostures.workload import check_search

    check_search({"window_minutes": {"quniform": [3, 9, 1]}}, "val_loss")
    check_search({"window_minutes": {"quniform": [3, 4, 0.5]}}, "val_loss")  # 3, 3.5, 4: 18, 21, 24 windows
