"""TPE proposer (hyperopt 0.3.0) and how TPESearch keeps `parallelism` models in flight; no Spark."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cerebro_tasks.search.space import hp_choice, hp_loguniform, hp_qloguniform, hp_quniform, hp_uniform, parse_space, sample
from cerebro_tasks.cerebro.search import TPESearch
from cerebro_tasks.search.tpe import TPEProposer

SPACE = {"lr": hp_loguniform(-5, 0), "opt": hp_choice(["sgd", "adam", "rmsprop"])}


def objective(cfg: dict) -> float:
    """Best at lr = 10**-1.5 with 'adam'; a loss (lower is better)."""
    return (math.log10(cfg["lr"]) + 1.5) ** 2 + (0.0 if cfg["opt"] == "adam" else 1.0)


def run_sequential(proposer: TPEProposer, n: int, score: bool = False) -> list[dict]:
    out = []
    for _ in range(n):
        cfg = proposer.propose(1)[0]
        out.append(cfg)
        proposer.observe(cfg, -objective(cfg) if score else objective(cfg))
    return out


def test_proposals_learn_from_earlier_results():
    tpe = run_sequential(TPEProposer(SPACE, seed=3, n_startup_jobs=8), 30)
    random = run_sequential(TPEProposer(SPACE, seed=3, n_startup_jobs=1000), 30)  # never leaves start-up
    assert tpe[:8] == random[:8]  # the same random start-up draws
    late_tpe = np.mean([objective(c) for c in tpe[-10:]])
    late_random = np.mean([objective(c) for c in random[-10:]])
    assert late_tpe < 0.6 * late_random
    assert sum(c["opt"] == "adam" for c in tpe[-10:]) >= 7  # the better optimizer was learnt


def test_score_metrics_are_maximised():
    proposer = TPEProposer(SPACE, seed=3, n_startup_jobs=8, metric_mode="max")
    configs = run_sequential(proposer, 30, score=True)  # value = -loss: higher is better
    assert np.mean([objective(c) for c in configs[-10:]]) < 0.6 * np.mean([objective(c) for c in configs[:8]])


def test_same_seed_same_proposals_other_seed_others():
    a = run_sequential(TPEProposer(SPACE, seed=11, n_startup_jobs=4), 12)
    b = run_sequential(TPEProposer(SPACE, seed=11, n_startup_jobs=4), 12)
    c = run_sequential(TPEProposer(SPACE, seed=12, n_startup_jobs=4), 12)
    assert a == b
    assert a != c


def test_parallel_proposals_pending_and_observed():
    proposer = TPEProposer(SPACE, seed=0, n_startup_jobs=2)
    first = proposer.propose(3)
    assert len({tuple(sorted(c.items())) for c in first}) == 3
    assert proposer.num_pending == 3 and proposer.num_observed == 0
    proposer.observe(first[1], objective(first[1]))
    proposer.observe(first[0], objective(first[0]))
    assert proposer.num_pending == 1 and proposer.num_observed == 2
    more = proposer.propose(2)  # TPE now (2 results); the pending one counts as bad, not as a repeat
    assert len(more) == 2 and first[2] not in more
    assert [p for p, _ in proposer.observations()] == [first[1], first[0]]


def test_outside_and_failed_observations():
    proposer = TPEProposer(SPACE, seed=0, n_startup_jobs=2)
    proposer.observe({"lr": 0.03, "opt": "adam"}, 0.1)  # e.g. a resumed run's finished model
    proposer.observe({"lr": 0.5, "opt": "sgd"}, float("nan"))  # a failed model: bad, not learnt from
    assert proposer.num_observed == 1
    assert math.isnan(proposer.observations()[1][1])
    assert len(proposer.propose(2)) == 2
    with pytest.raises(ValueError, match="not one of the choices"):
        proposer.observe({"lr": 0.1, "opt": "adagrad"}, 1.0)
    with pytest.raises(ValueError, match="lack"):
        proposer.observe({"lr": 0.1}, 1.0)


def test_value_semantics_match_random_search():
    space = {"lr": hp_loguniform(-4, -1), "bs": hp_quniform(16, 256, 16), "units": hp_qloguniform(1, 3, 10),
             "drop": hp_uniform(0.0, 0.5), "act": hp_choice(["relu", "tanh"])}
    tpe = TPEProposer(space, seed=5, n_startup_jobs=10_000).propose(300)
    rnd = sample(parse_space(space), 300, np.random.default_rng(5))
    for configs in (tpe, rnd):
        lr = np.log10([c["lr"] for c in configs])
        assert lr.min() >= -4 - 1e-9 and lr.max() <= -1 + 1e-9  # 10 ** U(-4, -1) in both, not e ** U
        assert -3.0 < np.median(lr) < -2.0
        assert all(isinstance(c["bs"], int) and c["bs"] % 16 == 0 and 16 <= c["bs"] <= 256 for c in configs)
        assert all(isinstance(c["units"], int) and c["units"] % 10 == 0 and c["units"] <= 1000 for c in configs)
        assert {c["act"] for c in configs} == {"relu", "tanh"}  # values, not hyperopt's indexes
        assert all(0.0 <= c["drop"] <= 0.5 for c in configs)


def test_identical_dimensions_draw_different_values():
    configs = TPEProposer({"a": hp_uniform(0, 1), "b": hp_uniform(0, 1)}, seed=1).propose(5)
    assert all(c["a"] != c["b"] for c in configs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="metric_mode"):
        TPEProposer(SPACE, seed=0, metric_mode="up")
    with pytest.raises(ValueError, match="search space parameter 'x'"):
        TPEProposer({"x": {"loguniform": [1]}}, seed=0)


class _Backend:
    def _num_workers(self) -> int:
        return 2


def test_tpe_searcher_learns_from_each_result_and_stops_at_num_models():
    searcher = TPESearch(_Backend(), None, lambda p: None, SPACE, num_models=5, num_epochs=1, n_startup_jobs=1).searcher
    first = searcher.propose(2)
    assert len(first) == 2
    searcher.observe(first[0], objective(first[0]))  # model 0 finished: its replacement knows that result
    assert len(searcher.propose(1)) == 1 and searcher.proposals[-1][1] == 1
    assert len(searcher.propose(10)) == 2 and searcher.propose(1) == []  # no more than num_models in all
    assert searcher.proposer.num_observed == 1


def test_a_resumed_tpe_searcher_continues_the_sequence_instead_of_repeating_it():
    def fresh():
        return TPESearch(_Backend(), None, lambda p: None, SPACE, num_models=6, num_epochs=1).searcher

    whole = fresh().propose(4)
    before = fresh()
    head = before.propose(2)
    resumed = fresh()
    resumed.load_state_dict(before.state_dict(), finished={0})  # model 0 finished, model 1 still training
    assert resumed.proposer.num_pending == 1 and resumed.remaining == 4
    assert head + resumed.propose(2) == whole  # random start-up draws: the same as without the restart


def test_tpe_search_direction_follows_metric():
    search = TPESearch(_Backend(), None, lambda p: None, SPACE, num_models=3, num_epochs=1, evaluation_metric="acc")
    assert search.proposer.metric_mode == "max"  # Cerebro refused maximised metrics in TPE
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):  # a name Keras does not know: say which way
        TPESearch(_Backend(), None, lambda p: None, SPACE, num_models=3, num_epochs=1, evaluation_metric="my_score")
    search = TPESearch(_Backend(), None, lambda p: None, SPACE, num_models=3, num_epochs=1,
                       evaluation_metric="my_score", mode="max")
    assert search.proposer.metric_mode == "max"
