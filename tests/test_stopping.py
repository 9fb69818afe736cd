"""Stopping rules (ASHA, Hyperband, median): every decision checked by hand, state round trips; no Spark."""

from __future__ import annotations

import json
import math
import random

import pytest

from cerebro_tasks.search.stopping import Decision, check_early_stopping, make_stopping_rule
from cerebro_tasks.search.stopping.asha import rungs


def asha(mode: str = "min", max_epochs: int = 9, **kw) -> object:
    return make_stopping_rule({"kind": "asha", "reduction_factor": 3, "min_epochs": 1, **kw}, mode=mode,
                              max_epochs=max_epochs)


def test_rungs_are_geometric_below_max_epochs():
    assert rungs(1, 3, 9) == [1, 3]
    assert rungs(1, 3, 10) == [1, 3, 9]
    assert rungs(2, 2, 16) == [2, 4, 8]
    assert rungs(1, 3, 1) == []


def test_asha_keeps_the_best_third_at_each_rung_and_revises_passes_until_the_next_rung():
    rule = asha()
    assert rule.on_result("a", 0, 0.5) == Decision(False)  # alone at rung 1
    b = rule.on_result("b", 0, 0.6)  # cutoff 0.5333: the 1/3 quantile of 0.5, 0.6
    assert b.stop and b.reason.startswith("ASHA rung 1") and "0.6" in b.reason and not b.others
    c = rule.on_result("c", 0, 0.4)  # cutoff 0.4667 of 0.4, 0.5, 0.6: c passes and pushes a out
    assert not c.stop and [m for m, _ in c.others] == ["a"] and "after c arrived" in c.others[0][1]
    assert rule.on_result("d", 0, 0.55).stop  # cutoff 0.5
    assert rule.on_result("c", 1, 9.0) == Decision(False)  # epoch 2 is no rung
    assert rule.on_result("c", 2, 0.3) == Decision(False)  # first at rung 3; c's pass at rung 1 is final now
    e = rule.on_result("e", 0, 0.45)  # cutoff 0.4667 of 0.4 .. 0.6: e passes, and c is past rung 1
    assert not e.stop and not e.others
    assert rule.on_result("e", 2, 0.35).stop  # rung 3: cutoff 0.3167 of 0.3, 0.35
    assert rule.on_result("c", 8, 99.0) == Decision(False)  # the last epoch: nothing left to save


def test_asha_follows_the_direction_of_the_metric():
    rule = asha(mode="max")
    assert not rule.on_result("a", 0, 0.5).stop
    b = rule.on_result("b", 0, 0.6)  # higher accuracy: kept, and a is out
    assert not b.stop and [m for m, _ in b.others] == ["a"]
    assert rule.on_result("c", 0, 0.4).stop


def test_a_diverged_model_stops_at_once_and_counts_as_worst():
    rule = asha()
    d = rule.on_result("a", 1, math.nan)  # not even a rung
    assert d.stop and "not a number" in d.reason
    assert not rule.on_result("b", 0, 100.0).stop
    restored = asha()
    restored.load_state_dict(json.loads(json.dumps(rule.state_dict(), allow_nan=False)))  # strict JSON, as stored
    assert restored.state_dict() == rule.state_dict()


def test_hyperband_deals_models_in_hyperband_proportions_and_judges_within_brackets():
    rule = make_stopping_rule({"kind": "hyperband"}, mode="min", max_epochs=9)
    assert [a.rungs for a in rule.brackets] == [[1, 3], [3], []]
    assert rule.weights == [9, 5, 3]
    for i in range(17):
        assert rule.on_result(f"m{i:02d}", 0, 1.0) == Decision(False)  # all alike: nobody stops at rung 1
    counts = [list(rule.bracket_of.values()).count(b) for b in range(3)]
    assert counts == [9, 5, 3]
    in_last = [m for m, b in rule.bracket_of.items() if b == 2]
    for e in range(1, 8):  # the last bracket trains its models to the end whatever their values
        for j, m in enumerate(in_last):
            assert not rule.on_result(m, e, 10.0 * (j + 1)).stop
    first_bracket = [m for m, b in rule.bracket_of.items() if b == 0]
    stopped = [m for m in first_bracket[1:] if rule.on_result(m, 1, 0.0).stop]  # epoch 2: no rung in bracket 0
    assert stopped == []
    d = [rule.on_result(m, 2, 1.0 + k) for k, m in enumerate(first_bracket)]
    assert not d[0].stop and all(x.stop for x in d[1:]) and d[1].reason.startswith("Hyperband bracket 0")


def test_median_rule_compares_best_so_far_with_the_median_of_running_means():
    rule = make_stopping_rule({"kind": "median", "min_epochs": 2, "min_samples": 2}, mode="min", max_epochs=5)
    assert not rule.on_result("a", 0, 1.0).stop
    assert not rule.on_result("b", 0, 1.2).stop
    assert not rule.on_result("c", 0, 9.0).stop  # before min_epochs: never
    assert not rule.on_result("a", 1, 0.8).stop  # only one other model has 2 epochs: too few samples
    assert not rule.on_result("b", 1, 0.9).stop  # a's mean 0.9 is the only other one: too few samples
    d = rule.on_result("c", 1, 1.06)  # best 1.06 vs median(0.9, 1.05) = 0.975
    assert d.stop and "median" in d.reason
    assert not rule.on_result("d", 0, 2.0).stop and not rule.on_result("d", 1, 0.9).stop  # 0.9 <= median


def test_state_round_trips_and_the_restored_rule_decides_alike():
    rng = random.Random(4)
    events = [(f"m{i}", e, rng.uniform(0, 1)) for e in range(9) for i in range(12)]
    for spec in ({"kind": "asha"}, {"kind": "hyperband", "reduction_factor": 2}, {"kind": "median"}):

        def feed(rule, evs, stopped):
            """Results in order, a stopped model reports nothing more; (model, epoch, stop) of each."""
            out = []
            for m, e, v in evs:
                if m not in stopped:
                    d = rule.on_result(m, e, v)
                    out.append((m, e, d.stop, d.others))
                    stopped.update([m] if d.stop else [], (o for o, _ in d.others))
            return out

        expected = feed(make_stopping_rule(spec, mode="min", max_epochs=9), events, set())
        stopped: set[str] = set()
        first = make_stopping_rule(spec, mode="min", max_epochs=9)
        head = feed(first, events[:50], stopped)
        restored = make_stopping_rule(spec, mode="min", max_epochs=9)
        restored.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
        assert head + feed(restored, events[50:], stopped) == expected, spec["kind"]
        assert 0 < sum(s for _, _, s, _ in expected) < 12, spec["kind"]  # the sequence stops some models, not all


@pytest.mark.parametrize("spec, message", [
    ({"kind": "asha", "reduction_factor": 1}, "reduction_factor"),
    ({"kind": "asha", "min_epochs": 0}, "min_epochs"),
    ({"kind": "asha", "eta": 3}, "takes"),
    ({"kind": "pbt"}, "kind"),
    ({"reduction_factor": 3}, "kind"),
    ({"kind": "median", "min_samples": 2.5}, "integer"),
])
def test_bad_settings_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        check_early_stopping(spec, max_epochs=10)
