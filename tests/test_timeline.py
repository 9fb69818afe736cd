"""The figures of a MOP run from its unit records (mop/timeline.py): pure Python, no Spark."""

from __future__ import annotations

import pytest

from cerebro_tasks.mop.timeline import hop_cost, timeline_figures
from cerebro_tasks.search.report import summary_markdown


def rec(model, kind, worker, start, seconds, arrival, *, n=100, build=0.0, load=0.0, data=0.0, step=0):
    return {"unit": {"model_id": model, "epoch": 0, "kind": kind, "partition": worker, "step": step},
            "partition": worker, "num_samples": n, "start": start, "end": start + seconds, "data_s": data,
            "build_s": build, "load_s": load, "save_s": 0.1, "compute_s": seconds - build - load - data - 0.1,
            "arrival": arrival, "reused_model": arrival == "stayed", "metrics": {}}


def test_true_hop_cost_pairs_the_same_unit_hopped_in_and_stayed():
    records = [
        rec("a", "train", 0, 0.0, 2.0, "stayed"), rec("a", "train", 0, 2.0, 2.2, "warm", load=0.2),
        rec("a", "train", 1, 0.0, 6.0, "cold", build=1.0, data=1.0),  # its data read is not the hop's
        rec("a", "train", 1, 6.0, 2.0, "stayed", n=50),  # another size: pairs with nothing
        rec("b", "val", 0, 4.2, 1.0, "stayed"), rec("b", "val", 1, 8.0, 3.0, "cold", build=1.5),
        rec("c", "train", 0, 5.2, 9.0, "cold"),  # never stayed anywhere: no baseline, left out
        rec("a", "train", 0, 14.2, 9.0, "new"),  # a's first unit on a graph already traced: not a hop
    ]
    got = hop_cost(records)
    # a/train/100: hopped in (2.2 warm, 5.0 cold) -> median 3.6 over 2.0; b/val: 3.0 over 1.0
    assert got["hop_cost_pairs"] == 2
    assert got["hop_cost"] == pytest.approx((1.8 + 3.0) / 2)
    assert got["hop_cost_warm"] == pytest.approx(1.1)
    assert got["hop_cost_cold"] == pytest.approx((2.5 + 3.0) / 2)

    figures = timeline_figures(records, 2)
    assert figures["arrivals"] == {"stayed": 3, "warm": 1, "cold": 3, "new": 1}
    assert figures["build_s"] == pytest.approx(2.5)  # counted as hop overhead, not as compute
    assert figures["hop_cost"] == got["hop_cost"]


def test_records_from_before_warm_models_still_pair_and_nothing_pairs_to_none():
    old = [{**rec("a", "train", 0, 0.0, 1.0, "stayed"), "arrival": None},
           {**rec("a", "train", 1, 0.0, 3.0, "cold"), "reused_model": False}]
    for r in old:
        del r["arrival"], r["data_s"], r["build_s"]
    assert hop_cost(old)["hop_cost"] == pytest.approx(3.0)
    assert hop_cost([rec("a", "train", 0, 0.0, 1.0, "cold")]) == {
        "hop_cost": None, "hop_cost_warm": None, "hop_cost_cold": None, "hop_cost_pairs": 0}


def test_summary_quotes_the_true_hop_cost():
    summary = {"metric": "val_loss", "models": [], "search": "grid", "run_id": "r", "best_model_id": "a",
               "mode": "min", "num_models": 1, "num_epochs": 1, "num_workers": 2, "wall_s": 1.0,
               "figures": {"utilisation": 0.9, "hop_overhead": 0.1, "makespan_s": 1.0, "hop_cost": 1.04,
                           "hop_cost_warm": 1.02, "hop_cost_cold": None}}
    md = summary_markdown(summary)
    assert "true hop cost 1.04x" in md and "on the worker 1.02x" in md and "for the unit n/a" in md


def test_summary_says_no_tail_when_the_last_models_end_together():
    summary = {"metric": "val_loss", "models": [], "search": "grid", "run_id": "r", "best_model_id": "a",
               "mode": "min", "num_models": 2, "num_epochs": 1, "num_workers": 2, "wall_s": 1.0,
               "figures": {"utilisation": 0.9, "hop_overhead": 0.1, "makespan_s": 1.0}}
    ended_together = summary_markdown({**summary, "figures": {**summary["figures"], "tail_s": 0.01,
                                                             "tail_utilisation": 0.5}})
    assert "no tail" in ended_together and "tail utilisation" not in ended_together
    tail = summary_markdown({**summary, "figures": {**summary["figures"], "tail_s": 3.0, "tail_utilisation": 0.5}})
    assert "tail utilisation 50.0% over the last 3.0 s" in tail
