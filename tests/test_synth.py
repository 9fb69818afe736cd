"""Tests for cerebro_tasks.deeppostures.synth: format, realism, learnability and reproducibility.

Data is tiny (compact days of 720 windows = 2 h) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os

import h5py
import numpy as np
import pytest

from cerebro_tasks.deeppostures import synth
from cerebro_tasks.deeppostures.h5format import (
    DATASETS,
    WINDOW_SECONDS,
    WINDOWS_PER_DAY,
    list_h5_files,
    read_h5,
    validate_consecutive_days,
)

K = 720  # windows per compact day file
SUBJECTS, DAYS, SEED = 3, 3, 5
START = dt.date(2024, 3, 4)


def midnight(date: dt.date) -> float:
    return dt.datetime(date.year, date.month, date.day, tzinfo=dt.timezone.utc).timestamp()


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> tuple[str, list[str]]:
    """3 subjects x 3 compact days, shared by the read-only tests."""
    root = str(tmp_path_factory.mktemp("compact"))
    return root, synth.synthesize(root, subjects=SUBJECTS, days=DAYS, seed=SEED, windows_per_day=K)


@pytest.fixture(scope="module")
def compact_days(compact):
    """Every day of the compact set, read and validated, by subject."""
    root, paths = compact
    by_subject: dict[str, list] = {}
    for path in paths:
        day = read_h5(path)  # validates every rule of the format
        by_subject.setdefault(day.subject, []).append(day)
    return by_subject


def concat(days, field: str) -> np.ndarray:
    return np.concatenate([getattr(day, field) for day in days])


# --- layout and format ------------------------------------------------------------------------


def test_layout_file_names_and_return_value(compact):
    root, paths = compact
    ids = [f"S{i:04d}" for i in range(1, SUBJECTS + 1)]
    dates = [(START + dt.timedelta(days=d)).isoformat() for d in range(DAYS)]
    expected = [os.path.join(root, s, f"{d}.h5") for s in ids for d in dates]
    assert paths == expected
    assert sorted(os.listdir(root)) == ids
    for sid in ids:  # nothing else in the folders: no temporary files left behind
        assert sorted(os.listdir(os.path.join(root, sid))) == [f"{d}.h5" for d in dates]
    assert [p for _, _, p in list_h5_files(root)] == expected


def test_datasets_dtypes_shapes_no_attributes_no_groups(compact):
    _, paths = compact
    for path in paths:
        with h5py.File(path, "r") as h5:
            assert sorted(h5.keys()) == sorted(DATASETS)
            assert len(h5.attrs) == 0
            for name, (dtype, trailing) in DATASETS.items():
                ds = h5[name]
                assert isinstance(ds, h5py.Dataset)
                assert ds.dtype == dtype and ds.shape == (K, *trailing)
                assert ds.chunks is not None and ds.compression is None
                assert ds.maxshape == (None, *trailing)
                assert len(ds.attrs) == 0
                info = h5py.h5o.get_info(ds.id)  # no timestamps: same seed, same bytes
                assert (info.ctime, info.mtime, info.atime, info.btime) == (0, 0, 0, 0)


def test_days_are_consecutive_and_continuous_across_the_first_midnight(compact, compact_days):
    root, _ = compact
    files = list_h5_files(root)
    for sid, days in compact_days.items():
        validate_consecutive_days([(d, p) for s, d, p in files if s == sid])
        first, second = days[0], days[1]
        assert first.time[-1] + WINDOW_SECONDS == midnight(second.date)  # day 1 ends at midnight
        assert second.time[0] == midnight(second.date)
        assert days[2].time[0] == midnight(days[2].date)
        # A segment (no sleep, no non-wear, labelled) runs on across that midnight.
        for day, i in ((first, -1), (second, 0)):
            assert (day.sleeping[i], day.non_wear[i]) == (0, 0) and day.label[i] >= 0


def test_full_days_partial_first_and_last(tmp_path):
    paths = synth.synthesize(str(tmp_path), subjects=1, days=2, seed=1)
    first, last = (read_h5(p) for p in paths)
    start_hour = (first.time[0] - midnight(first.date)) / 3600
    end_hour = (last.time[-1] + WINDOW_SECONDS - midnight(last.date)) / 3600
    assert 13 <= start_hour < 16 and first.time[-1] + WINDOW_SECONDS == midnight(last.date)
    assert last.time[0] == midnight(last.date) and 11 <= end_hour <= 13
    assert first.num_windows < WINDOWS_PER_DAY and last.num_windows < WINDOWS_PER_DAY
    # One night: asleep at midnight, up in the morning (07:00 +- 2 h), awake at the end.
    assert first.sleeping[-1] == 1 and last.sleeping[0] == 1 and last.sleeping[-1] == 0
    assert 5 * 360 <= last.sleeping.sum() <= 9 * 360


def test_full_day_plans_hold_8640_windows_in_the_middle():
    plans = synth._full_day_plans(np.random.default_rng(0), START, 4)
    assert [p.num_windows for p in plans][1:3] == [WINDOWS_PER_DAY, WINDOWS_PER_DAY]
    assert all(b.first_window == a.first_window + a.num_windows for a, b in zip(plans, plans[1:]))


# --- content ----------------------------------------------------------------------------------


def test_labels_and_flags(compact_days):
    days = [d for ds in compact_days.values() for d in ds]
    label, sleeping, non_wear = (concat(days, f) for f in ("label", "sleeping", "non_wear"))
    assert set(np.unique(label)) == {-1, 0, 1}
    assert set(np.unique(sleeping)) == {0, 1} and set(np.unique(non_wear)) == {0, 1}
    excluded = (sleeping == 1) | (non_wear == 1)
    assert not ((sleeping == 1) & (non_wear == 1)).any()
    assert (label[excluded] == -1).all()  # the default: excluded windows carry no label


def test_about_80_percent_sitting_and_every_kind_of_window(compact_days):
    for sid, days in compact_days.items():
        label, sleeping, non_wear = (concat(days, f) for f in ("label", "sleeping", "non_wear"))
        labelled = label >= 0
        sitting = float(np.mean(label[labelled] == 0))
        assert 0.65 <= sitting <= 0.92, (sid, sitting)
        assert 0.1 <= sleeping.mean() <= 0.3, sid
        assert 0.02 <= non_wear.mean() <= 0.12, sid
        unlabelled_awake = (label == -1) & (sleeping == 0) & (non_wear == 0)
        assert 0.03 <= unlabelled_awake.mean() <= 0.15, sid
    everything = [d for ds in compact_days.values() for d in ds]
    label = concat(everything, "label")
    assert 0.72 <= np.mean(label[label >= 0] == 0) <= 0.88


def test_signal_is_in_g_and_differs_by_state(compact_days):
    days = [d for ds in compact_days.values() for d in ds]
    data, label, non_wear = concat(days, "data"), concat(days, "label"), concat(days, "non_wear")
    assert np.abs(data).max() < 4.0
    magnitude = np.linalg.norm(data.mean(axis=1), axis=1)  # gravity dominates window means
    assert 0.85 < np.median(magnitude) < 1.1
    movement = data.std(axis=1).sum(axis=1)
    assert np.median(movement[non_wear == 1]) < 0.01  # flat on the table
    assert np.median(movement[label == 1]) > 2 * np.median(movement[label == 0])


def test_walking_has_a_step_rhythm(compact_days):
    day = compact_days["S0001"][0]
    moving = day.data[day.label == 1]
    walking = moving[moving.std(axis=1).sum(axis=1) > 0.3]
    assert len(walking) > 5
    spectrum = np.abs(np.fft.rfft(walking - walking.mean(axis=1, keepdims=True), axis=1)).sum(0)
    freqs = np.fft.rfftfreq(100, d=0.1)
    assert 1.5 <= freqs[np.argmax(spectrum.sum(axis=1))] <= 2.3  # cadence, in Hz


def test_label_excluded_writes_activpal_labels_on_excluded_windows(tmp_path):
    path = synth.synthesize(str(tmp_path), subjects=1, days=1, seed=2, windows_per_day=360,
                            label_excluded=True)[0]
    day = read_h5(path)
    assert (day.label[day.sleeping == 1] == 0).all()
    assert (day.label[day.non_wear == 1] >= 0).any()


# --- learnability -----------------------------------------------------------------------------


def features(day) -> np.ndarray:
    """Per-window mean and standard deviation of each axis."""
    return np.concatenate([day.data.mean(axis=1), day.data.std(axis=1)], axis=1)


def training_windows(days) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the windows training would use."""
    keep = [(d.label >= 0) & (d.sleeping == 0) & (d.non_wear == 0) for d in days]
    x = np.concatenate([features(d)[k] for d, k in zip(days, keep)])
    y = np.concatenate([d.label[k] for d, k in zip(days, keep)])
    return x, y


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean([np.mean(predicted[y == c] == c) for c in (0, 1)]))


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 300) -> np.ndarray:
    """Class-balanced logistic regression by gradient descent; returns weights with bias last."""
    x = np.hstack([x, np.ones((len(x), 1))])
    weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        w -= 0.5 * x.T @ ((p - y) * weight) / len(y)
    return w


def test_a_trivial_classifier_learns_across_subjects(tmp_path):
    paths = synth.synthesize(str(tmp_path), subjects=6, days=2, seed=11, windows_per_day=K)
    days = [read_h5(p, validate=False) for p in paths]
    train = [d for d in days if d.subject <= "S0004"]
    test = [d for d in days if d.subject > "S0004"]
    x_train, y_train = training_windows(train)
    x_test, y_test = training_windows(test)
    mean, std = x_train.mean(0), x_train.std(0)
    w = fit_logistic((x_train - mean) / std, y_train)
    z = np.hstack([(x_test - mean) / std, np.ones((len(x_test), 1))]) @ w
    score = balanced_accuracy(y_test, (z > 0).astype(int))
    majority = balanced_accuracy(y_test, np.zeros_like(y_test))
    assert majority == 0.5 and np.mean(y_test == 0) > 0.6  # sitting is the majority
    assert score >= 0.75, score  # 0.89 here; 0.79-0.998 over 20 seeds


# --- reproducibility --------------------------------------------------------------------------


def test_same_seed_same_bytes_and_more_subjects_leave_earlier_ones_unchanged(compact, tmp_path):
    _, paths = compact
    again = synth.synthesize(str(tmp_path / "a"), subjects=SUBJECTS, days=DAYS, seed=SEED,
                             windows_per_day=K)
    assert [sha256(p) for p in again] == [sha256(p) for p in paths]
    more = synth.synthesize(str(tmp_path / "b"), subjects=SUBJECTS + 1, days=DAYS, seed=SEED,
                            windows_per_day=K)
    assert [sha256(p) for p in more[:len(paths)]] == [sha256(p) for p in paths]


def test_different_seed_different_data(compact, tmp_path):
    _, paths = compact
    other = synth.synthesize(str(tmp_path), subjects=1, days=1, seed=SEED + 1, windows_per_day=K)
    a, b = read_h5(paths[0]), read_h5(other[0])
    assert sha256(paths[0]) != sha256(other[0])
    assert not np.allclose(a.data, b.data) and not np.array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.time, b.time)  # the compact clock does not depend on seed


def test_rerun_overwrites_but_stale_days_are_refused(tmp_path):
    root = str(tmp_path)
    first = synth.synthesize(root, subjects=1, days=2, seed=3, windows_per_day=60)
    digests = [sha256(p) for p in first]
    assert [sha256(p) for p in synth.synthesize(root, subjects=1, days=2, seed=3,
                                                windows_per_day=60)] == digests
    with pytest.raises(FileExistsError, match="2024-03-05.h5"):
        synth.synthesize(root, subjects=1, days=1, seed=3, windows_per_day=60)
    assert [sha256(p) for p in first] == digests  # nothing was touched


@pytest.mark.parametrize("kwargs, message", [
    ({"subjects": -1}, "subjects"),
    ({"days": 0}, "days"),
    ({"seed": -5}, "seed"),
    ({"windows_per_day": 0}, "windows_per_day"),
    ({"windows_per_day": WINDOWS_PER_DAY + 1}, "windows_per_day"),
    ({"start_date": "03/04/2024"}, "start_date"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"subjects": 1, "days": 1, "seed": 0, "windows_per_day": 10, **kwargs}
    with pytest.raises(ValueError, match=f"^{message}: expected"):
        synth.synthesize(str(tmp_path), **args)


def test_unsafe_subject_prefix(tmp_path):
    with pytest.raises(ValueError, match="field 'subject'"):
        synth.synthesize(str(tmp_path), subjects=1, days=1, seed=0, subject_prefix="../x")


def test_cli_arguments(tmp_path):
    parser = synth.add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path), "--subjects", "2", "--days", "2",
                              "--seed", "4", "--windows-per-day", "30"])
    paths = synth.run_cli(args)
    assert len(paths) == 4 and [read_h5(p).num_windows for p in paths] == [30] * 4


def test_failed_write_leaves_no_file_behind(tmp_path):
    arrays = {"time": np.zeros(2), "data": np.zeros((2, 100, 3)), "non_wear": np.zeros(2)}
    with pytest.raises(KeyError):  # 'sleeping' is missing: fails half-way through the file
        synth.write_day_h5(str(tmp_path / "2024-03-04.h5"), arrays)
    assert os.listdir(tmp_path) == []


def test_module_main(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path), "--subjects", "1", "--days", "1", "--seed", "0",
                       "--windows-per-day", "12"]) == 0
    assert "wrote 1 files" in capsys.readouterr().out
