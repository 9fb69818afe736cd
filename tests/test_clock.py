"""The study's clock (cerebro_tasks.deeppostures.clock) and the H5 checks that follow from it.

DeepPostures' pre-processing runs ``time.mktime`` in its machine's zone; the C library is the
oracle here (a subprocess with ``TZ`` set), including the daylight-saving days of Los Angeles
and Sydney.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np
import pytest

from cerebro_tasks.deeppostures import clock, h5format
from cerebro_tasks.deeppostures.classes import DEFAULT_LABEL_MAP, check_label_map, class_names
from cerebro_tasks.deeppostures.synth import synthesize

# (zone, a day clocks go forward, a day they go back) in 2024
DST_DAYS = [("America/Los_Angeles", "2024-03-10", "2024-11-03"), ("Australia/Sydney", "2024-10-06", "2024-04-07")]


def mktime_in(zone: str, walls: list[str]) -> list[float]:
    """``time.mktime`` of naive wall-clock times, computed by the C library in ``zone``."""
    code = ("import json, sys, time, datetime as dt; "
            "print(json.dumps([time.mktime(dt.datetime.fromisoformat(w).timetuple()) for w in json.load(sys.stdin)]))")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(walls), capture_output=True, text=True,
                          env={"TZ": zone, "PATH": "/usr/bin:/bin"}, timeout=60, check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("zone, forward, back", DST_DAYS)
def test_wall_to_epoch_is_mktime_on_daylight_saving_days(zone: str, forward: str, back: str) -> None:
    for day in (forward, back, "2024-06-01"):
        start = dt.datetime.fromisoformat(day)
        walls = [start + dt.timedelta(seconds=10 * i) for i in range(0, 8640, 7)]
        naive = np.array([(w - dt.datetime(1970, 1, 1)).total_seconds() for w in walls])
        expected = mktime_in(zone, [w.isoformat() for w in walls])
        np.testing.assert_array_equal(clock.wall_to_epoch(naive, zone), expected)


@pytest.mark.parametrize("zone, forward, back", DST_DAYS)
def test_local_days_and_offset_changes(zone: str, forward: str, back: str) -> None:
    for day, hours, change in ((forward, 23, 3600), (back, 25, -3600), ("2024-06-01", 24, None)):
        start, end = clock.day_bounds(dt.date.fromisoformat(day), zone)
        assert end - start == hours * 3600
        changes = clock.offset_changes(start, end, zone)
        assert [c for _, c in changes] == ([] if change is None else [change])
        for at, c in changes:
            assert clock.utc_offset(at, zone) - clock.utc_offset(at - 1, zone) == c


def test_unknown_zone_is_named() -> None:
    with pytest.raises(ValueError, match="'America/San_Diego'"):
        clock.check_zone("America/San_Diego")
    assert clock.check_zone("Australia/Sydney") == "Australia/Sydney"


def test_zones_that_fit_find_the_pre_processing_zone() -> None:
    day = dt.date(2024, 6, 1)
    start, end = clock.day_bounds(day, "Australia/Sydney")
    fits = clock.zones_that_fit([(day, start, end - 10)])
    assert fits[0] == "Australia/Sydney" and "UTC" not in fits and "America/Los_Angeles" not in fits


# ------------------------------------------------------------------------------------------------
# the H5 checks in the study's zone
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, str]:
    """One subject, three full days around each 2024 change of Los Angeles, as pre-processed
    there (and in UTC)."""
    root = tmp_path_factory.mktemp("zones")
    out = {}
    for name, zone, start in (("utc", "UTC", "2024-03-09"), ("la_spring", "America/Los_Angeles", "2024-03-09"),
                              ("la_autumn", "America/Los_Angeles", "2024-11-02")):
        synthesize(str(root / name), subjects=1, days=3, seed=5, timezone=zone, start_date=start)
        out[name] = str(root / name / "S0001")
    return out


def test_a_study_reads_the_same_in_its_zone(studies) -> None:
    utc = h5format.read_h5(f"{studies['utc']}/2024-03-09.h5")
    la = h5format.read_h5(f"{studies['la_spring']}/2024-03-09.h5", timezone="America/Los_Angeles")
    assert la.num_windows == utc.num_windows
    np.testing.assert_array_equal(la.data, utc.data)
    np.testing.assert_array_equal(la.label, utc.label)
    np.testing.assert_array_equal(la.time - utc.time, 8 * 3600)  # PST: UTC-8


def test_a_study_read_in_the_wrong_zone_names_the_zone(studies) -> None:
    with pytest.raises(h5format.OutsideDateError) as err:
        h5format.read_h5(f"{studies['la_spring']}/2024-03-09.h5", timezone="UTC")
    assert "within 2024-03-09 (UTC)" in str(err.value) and err.value.first < err.value.last


def test_an_hour_repeated_is_kept_in_order(studies) -> None:
    day = h5format.read_h5(f"{studies['la_autumn']}/2024-11-03.h5", timezone="America/Los_Angeles")
    assert day.num_windows == 8640  # the device's wall clock: 24 hours of windows
    steps = np.diff(day.time)
    assert sorted(set(steps.tolist())) == [10.0, 3610.0] and (steps == 3610).sum() == 1
    # mktime reads 01:00-01:59:50 once (daylight time): the step comes at wall 02:00 (window 720)
    assert int(np.flatnonzero(steps == 3610)[0]) + 1 == 720


def test_an_hour_skipped_is_refused_naming_the_windows(studies) -> None:
    with pytest.raises(h5format.H5FormatError) as err:
        h5format.read_h5(f"{studies['la_spring']}/2024-03-10.h5", timezone="America/Los_Angeles")
    assert err.value.field == "time"
    assert ("found windows 720-1079 (device wall clock 2024-03-10 02:00:00 to 2024-03-10 02:59:50, in the hour "
            "America/Los_Angeles skips at 2024-03-10 02:00:00) at the epoch seconds of windows 1080-1439") \
        in err.value.problem
    # the days around it are fine
    h5format.read_h5(f"{studies['la_spring']}/2024-03-11.h5", timezone="America/Los_Angeles")


def test_labels_are_checked_against_the_number_of_classes(tmp_path) -> None:
    path = synthesize(str(tmp_path), subjects=1, days=1, seed=2, windows_per_day=360, num_classes=3)[0]
    day = h5format.read_h5(path, num_classes=3)
    assert set(np.unique(day.label)) == {-1, 0, 1, 2}
    with pytest.raises(h5format.H5FormatError, match=r"expected values in \{-1, 0, 1\}, found 2"):
        h5format.read_h5(path)  # the default: two classes


# ------------------------------------------------------------------------------------------------
# the label map
# ------------------------------------------------------------------------------------------------


def test_label_map_defaults_and_checks() -> None:
    assert check_label_map(None) == DEFAULT_LABEL_MAP
    three = check_label_map('{"stepping": 2, "sitting": 0, "standing": 1}')
    assert list(three) == ["sitting", "standing", "stepping"]
    assert class_names(three) == {0: "sitting", 1: "standing", 2: "stepping", -1: "no-label"}
    for bad in ({"sitting": 0}, {"a": 0, "b": 2}, {"a": 0, "b": 0}, {"a,b": 0, "c": 1}, {"no-label": 0, "b": 1},
                {"a": 0, "b": "1"}, "[0, 1]", "{"):
        with pytest.raises(ValueError, match="label map"):
            check_label_map(bad)
