"""Segments and sequences (cerebro_tasks.deeppostures.sequences) against hand-made cases and a naive oracle.

Window ``i`` of every test table carries the value ``i`` in all its samples, so the content of a
built sequence says which table rows it holds.
"""

from __future__ import annotations

import numpy as np
import pytest

from cerebro_tasks.deeppostures.sequences import (
    build_prediction_sequences,
    build_training_sequences,
    class_weights,
    sample_weights,
    segment_ids,
)

T0 = 1_704_067_200  # 2024-01-01 00:00:00 UTC


def make_table(
    n: int,
    *,
    ids: list[str] | None = None,
    time: np.ndarray | None = None,
    sleeping: list[int] = (),
    non_wear: list[int] = (),
    unlabelled: list[int] = (),
    label: np.ndarray | None = None,
    data_dtype: type = np.float32,
) -> dict[str, np.ndarray]:
    """A window table of ``n`` rows; flags set at the given rows; data[i] == i everywhere."""
    table = {
        "id": np.array(ids if ids is not None else ["s1"] * n, dtype=object),
        "time": np.asarray(time, dtype=np.int64) if time is not None else T0 + 10 * np.arange(n, dtype=np.int64),
        "data": np.broadcast_to(np.arange(n, dtype=data_dtype)[:, None, None], (n, 100, 3)).copy(),
        "non_wear": np.zeros(n, np.int32),
        "sleeping": np.zeros(n, np.int32),
        "label": (np.arange(n) % 2).astype(np.int32) if label is None else np.asarray(label, np.int32),
    }
    table["sleeping"][list(sleeping)] = 1
    table["non_wear"][list(non_wear)] = 1
    table["label"][list(unlabelled)] = -1
    return table


def rows_of(X: np.ndarray) -> np.ndarray:
    """Row number carried by each window of X (zero windows read as 0)."""
    return X[..., 0, 0].astype(np.int64)


# ---------------------------------------------------------------- segment_ids


def test_sleep_in_the_middle_splits_the_segment() -> None:
    t = make_table(10, sleeping=[4])
    assert segment_ids(t, training=True).tolist() == [0, 0, 0, 0, -1, 1, 1, 1, 1, 1]


def test_non_wear_run_splits_the_segment() -> None:
    t = make_table(8, non_wear=[0, 3, 4])
    assert segment_ids(t, training=False).tolist() == [-1, 0, 0, -1, -1, 1, 1, 1]


def test_unlabelled_windows_excluded_in_training_only() -> None:
    t = make_table(6, unlabelled=[2])
    assert segment_ids(t, training=True).tolist() == [0, 0, -1, 1, 1, 1]
    assert segment_ids(t, training=False).tolist() == [0, 0, 0, 0, 0, 0]


def test_time_plays_no_part_unless_splitting_on_gaps_is_asked() -> None:
    time = T0 + 10 * np.arange(6)
    time[3:] += 10  # one missing window between rows 2 and 3
    t = make_table(6, time=time)
    # DeepPostures' own reader looks only at the flags:
    assert segment_ids(t, training=True).tolist() == [0] * 6
    assert segment_ids(t, training=True, split_on_gaps=True).tolist() == [0, 0, 0, 1, 1, 1]


def test_the_first_midnight_jump_does_not_end_a_segment() -> None:
    # Day 1 starts at the recording's start second (here :17), day 2 at 00:00:00: the last window
    # of day 1 starts at 23:59:47, 13 s before the first of day 2. Normal data, not a gap.
    start = T0 + 86_400 - 43
    time = np.concatenate([start + 10 * np.arange(4), T0 + 86_400 + 10 * np.arange(3)])
    t = make_table(7, time=time)
    assert np.diff(time).tolist() == [10, 10, 10, 13, 10, 10]
    assert segment_ids(t, training=True).tolist() == [0] * 7
    X, _ = build_training_sequences(t, 7)
    assert rows_of(X).tolist() == [list(range(7))]


def test_new_subject_ends_a_segment_even_with_contiguous_time() -> None:
    t = make_table(6, ids=["a", "a", "a", "b", "b", "b"])
    assert segment_ids(t, training=True).tolist() == [0, 0, 0, 1, 1, 1]


def test_segments_continue_across_midnight() -> None:
    # Rows of two consecutive day files of one subject: 23:59:30 .. 00:00:30.
    start = T0 + 86_400 - 30
    t = make_table(7, time=start + 10 * np.arange(7))
    assert segment_ids(t, training=True).tolist() == [0] * 7


def test_segment_numbering_is_global_over_a_concatenated_table() -> None:
    t = make_table(9, ids=["a"] * 5 + ["b"] * 4, sleeping=[2, 7])
    assert segment_ids(t, training=False).tolist() == [0, 0, -1, 1, 1, 2, 2, -1, 3]


def test_empty_table() -> None:
    t = make_table(0)
    assert segment_ids(t, training=True).shape == (0,)
    X, y = build_training_sequences(t, 4)
    assert X.shape == (0, 4, 100, 3) and y.shape == (0, 4)
    X, idx = build_prediction_sequences(t, 4, "zero")
    assert X.shape == (0, 4, 100, 3) and idx.shape == (0, 4)


# ---------------------------------------------------------------- training sequences


def test_training_remainder_dropped() -> None:
    t = make_table(10)
    X, y = build_training_sequences(t, 4)
    assert X.shape == (2, 4, 100, 3) and X.dtype == np.float32
    assert y.dtype == np.int32
    assert rows_of(X).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y.tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]


def test_training_sequences_never_cross_exclusions_or_subjects() -> None:
    # seg0 rows 0-4 (5), sleep 5, seg1 rows 6-8 (3, unlabelled 9 ends it), seg2 rows 10-12 (new subject at 13)
    ids = ["a"] * 13 + ["b"] * 7
    t = make_table(20, ids=ids, sleeping=[5], unlabelled=[9])
    X, y = build_training_sequences(t, 3)
    assert rows_of(X).tolist() == [[0, 1, 2], [6, 7, 8], [10, 11, 12], [13, 14, 15], [16, 17, 18]]
    np.testing.assert_array_equal(y, t["label"][rows_of(X)])


def test_training_window_longer_than_every_segment() -> None:
    t = make_table(10, sleeping=[5])
    X, y = build_training_sequences(t, 6)
    assert X.shape == (0, 6, 100, 3) and y.shape == (0, 6)


def test_training_float64_source_becomes_float32() -> None:
    t = make_table(8, data_dtype=np.float64)
    X, _ = build_training_sequences(t, 4)
    assert X.dtype == np.float32
    assert rows_of(X).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


# ---------------------------------------------------------------- class / sample weights


def test_class_weights_balanced_and_ignore_unlabelled() -> None:
    y = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, -1, -1]])
    w = class_weights(y)
    assert w == pytest.approx({0: 10 / (2 * 8), 1: 10 / (2 * 2)})
    assert class_weights(np.array([-1, -1])) == {}


def test_sample_weights_map_and_mask() -> None:
    y = np.array([[0, 1, -1], [1, 1, 0]])
    sw = sample_weights(y, {0: 0.5, 1: 2.0})
    assert sw.dtype == np.float32 and sw.shape == (2, 3)
    assert sw.tolist() == [[0.5, 2.0, 0.0], [2.0, 2.0, 0.5]]
    with pytest.raises(ValueError, match="no entry"):
        sample_weights(y, {0: 1.0})


# ---------------------------------------------------------------- prediction sequences


def test_prediction_drop() -> None:
    X, idx = build_prediction_sequences(make_table(10), 4, "drop")
    assert idx.dtype == np.int64
    assert idx.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rows_of(X).tolist() == idx.tolist()


def test_prediction_zero_pads_with_zero_windows() -> None:
    t = make_table(10)
    t["data"] += 1.0  # so that a zero window cannot be mistaken for row 0
    X, idx = build_prediction_sequences(t, 4, "zero")
    assert idx.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
    assert (X[2, 2:] == 0).all()
    assert (rows_of(X[2, :2]) == [9, 10]).all()  # data of rows 8, 9 (+1)


def test_prediction_wrap_reuses_last_window_and_keeps_new_steps() -> None:
    X, idx = build_prediction_sequences(make_table(10), 4, "wrap")
    assert idx.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [-1, -1, 8, 9]]
    assert rows_of(X[2]).tolist() == [6, 7, 8, 9]  # the segment's last 4 windows


def test_prediction_wrap_segment_shorter_than_window_acts_like_zero() -> None:
    t = make_table(3)
    t["data"] += 1.0
    X, idx = build_prediction_sequences(t, 4, "wrap")
    assert idx.tolist() == [[0, 1, 2, -1]]
    assert rows_of(X).tolist() == [[1, 2, 3, 0]]


@pytest.mark.parametrize("padding", ["drop", "zero", "wrap"])
def test_prediction_exact_multiple_has_no_tail(padding: str) -> None:
    _, idx = build_prediction_sequences(make_table(8), 4, padding)
    assert idx.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_prediction_includes_unlabelled_and_skips_sleep_and_non_wear() -> None:
    # segments: rows 0-2 (3), sleep 3, rows 4-9 (6, row 5 unlabelled), non-wear 10, rows 11-12 (2)
    t = make_table(13, sleeping=[3], non_wear=[10], unlabelled=[5])
    _, idx = build_prediction_sequences(t, 2, "drop")
    assert idx.tolist() == [[0, 1], [4, 5], [6, 7], [8, 9], [11, 12]]
    _, idx = build_prediction_sequences(t, 4, "wrap")
    assert idx.tolist() == [[0, 1, 2, -1], [4, 5, 6, 7], [-1, -1, 8, 9], [11, 12, -1, -1]]


def test_bad_arguments() -> None:
    t = make_table(4)
    with pytest.raises(ValueError):
        build_prediction_sequences(t, 2, "mirror")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_training_sequences(t, 0)
    with pytest.raises(KeyError):
        segment_ids({k: v for k, v in t.items() if k != "sleeping"}, training=True)


# ---------------------------------------------------------------- against a naive oracle


def _oracle_segments(t: dict[str, np.ndarray], training: bool) -> list[list[int]]:
    """DeepPostures-style reader, one window at a time: flags and subjects only, never time."""
    segments: list[list[int]] = []
    current: list[int] = []
    for i in range(len(t["time"])):
        excluded = t["sleeping"][i] == 1 or t["non_wear"][i] == 1 or (training and t["label"][i] == -1)
        breaks = i > 0 and t["id"][i] != t["id"][i - 1]
        if current and (excluded or breaks):
            segments.append(current)
            current = []
        if not excluded:
            current.append(i)
    if current:
        segments.append(current)
    return segments


def _oracle_prediction(segments: list[list[int]], T: int, padding: str) -> list[tuple[list[int], list[int]]]:
    """(source rows, written rows) per chunk, -1 = zero window / not written."""
    out = []
    for seg in segments:
        full = len(seg) // T * T
        for k in range(0, full, T):
            out.append((seg[k : k + T], seg[k : k + T]))
        r = len(seg) - full
        if r and padding == "zero" or (r and padding == "wrap" and len(seg) < T):
            tail = seg[full:] + [-1] * (T - r)
            out.append((tail, tail))
        elif r and padding == "wrap":
            src = seg[-T:]
            out.append((src, [-1] * (T - r) + src[T - r :]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tables_match_the_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 600
    ids = np.repeat(["a", "b", "c"], [250, 200, 150]).tolist()
    time = T0 + 10 * np.arange(n)
    time[rng.choice(n, 5, replace=False)] += 7  # a few time gaps: no effect on segments
    t = make_table(
        n,
        ids=ids,
        time=time,
        sleeping=rng.choice(n, 30, replace=False).tolist(),
        non_wear=rng.choice(n, 20, replace=False).tolist(),
        unlabelled=rng.choice(n, 25, replace=False).tolist(),
    )
    for training in (True, False):
        segs = _oracle_segments(t, training)
        expected = np.full(n, -1)
        for k, rows in enumerate(segs):
            expected[rows] = k
        np.testing.assert_array_equal(segment_ids(t, training=training), expected)

    T = 7
    X, y = build_training_sequences(t, T)
    expected_rows = [s[k : k + T] for s in _oracle_segments(t, True) for k in range(0, len(s) // T * T, T)]
    assert rows_of(X).tolist() == expected_rows
    np.testing.assert_array_equal(y, t["label"][np.array(expected_rows)])

    t["data"] += 1.0  # zero windows distinguishable from row 0
    for padding in ("drop", "zero", "wrap"):
        X, idx = build_prediction_sequences(t, T, padding)
        chunks = _oracle_prediction(_oracle_segments(t, False), T, padding)
        assert idx.tolist() == [w for _, w in chunks]
        assert (rows_of(X) - 1).tolist() == [s for s, _ in chunks]
        written = idx[idx >= 0]
        assert (np.diff(written) > 0).all()  # each row once, in time order
