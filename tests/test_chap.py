"""The CHAP prediction CSV (cerebro_tasks.deeppostures.chap) with fake predict_fns: no model needed.

Window ``i`` of every test table carries the value ``i + 1`` in all samples (so zero padding is
recognisable), and the fake model predicts the parity of that value: each written row's
prediction therefore says which window it was computed from.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time as _time
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from cerebro_tasks.deeppostures.chap import format_timestamps, predict_subject, to_class_ids, write_csv

T0 = 1_704_153_570  # 2024-01-01 23:59:30 UTC: tables cross midnight


def make_table(n: int, *, sleeping=(), non_wear=(), unlabelled=(), subject: str = "s1") -> dict[str, np.ndarray]:
    t = {
        "id": np.array([subject] * n, dtype=object),
        "time": T0 + 10 * np.arange(n, dtype=np.int64),
        "data": np.broadcast_to(np.arange(1, n + 1, dtype=np.float32)[:, None, None], (n, 100, 3)).copy(),
        "non_wear": np.zeros(n, np.int32),
        "sleeping": np.zeros(n, np.int32),
        "label": np.zeros(n, np.int32),
    }
    t["sleeping"][list(sleeping)] = 1
    t["non_wear"][list(non_wear)] = 1
    t["label"][1::3] = 1
    t["label"][list(unlabelled)] = -1
    return t


def parity_ids(X: np.ndarray) -> np.ndarray:
    """Class ids (B, T): 1 when the window's value (row + 1) is odd, i.e. for even rows."""
    return (X[..., 0, 0].astype(np.int64) % 2).astype(np.int32)


def parity_probs(X: np.ndarray) -> np.ndarray:
    """The same decision as (B, T, 2) probabilities."""
    p1 = parity_ids(X).astype(np.float32) * 0.8 + 0.1
    return np.stack([1 - p1, p1], axis=-1)


def expected_prediction(rows: np.ndarray) -> list[str]:
    return ["not-sitting" if (r + 1) % 2 else "sitting" for r in rows]


def test_csv_exact_format(tmp_path) -> None:
    # rows 0-4 segment 0 (row 2 unlabelled), 5 asleep, 6-7 segment 1 (too short for T=3: no rows),
    # 8 non-wear, 9-14 segment 2.
    table = make_table(15, sleeping=[5], non_wear=[8], unlabelled=[2])
    df = predict_subject(table, parity_ids, window_size=3, include_label=True)
    path = tmp_path / "CHAP_TEST" / "s1.csv"
    write_csv(df, path)
    assert path.read_text() == (
        "segment,timestamp,label,prediction\n"
        "0,2024-01-01 23:59:30,sitting,not-sitting\n"
        "0,2024-01-01 23:59:40,not-sitting,sitting\n"
        "0,2024-01-01 23:59:50,no-label,not-sitting\n"
        "2,2024-01-02 00:01:00,sitting,sitting\n"
        "2,2024-01-02 00:01:10,not-sitting,not-sitting\n"
        "2,2024-01-02 00:01:20,sitting,sitting\n"
        "2,2024-01-02 00:01:30,sitting,not-sitting\n"
        "2,2024-01-02 00:01:40,not-sitting,sitting\n"
        "2,2024-01-02 00:01:50,sitting,not-sitting\n"
    )
    # Without labels the header is the default one; dtypes read back as written.
    df = predict_subject(table, parity_ids, window_size=3)
    assert list(df.columns) == ["segment", "timestamp", "prediction"]
    write_csv(df, path)
    back = pd.read_csv(path)
    assert back["segment"].tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2]
    no_seg = predict_subject(table, parity_ids, window_size=3, include_segment=False)
    assert list(no_seg.columns) == ["timestamp", "prediction"]


@pytest.mark.parametrize(
    "padding, rows",
    [
        ("drop", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("zero", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("wrap", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ],
)
def test_padding_modes_predict_each_window_from_itself(padding: str, rows: list[int]) -> None:
    table = make_table(10)
    calls: list[np.ndarray] = []

    def fn(X: np.ndarray) -> np.ndarray:
        calls.append(X.copy())
        return parity_ids(X)

    df = predict_subject(table, fn, window_size=4, padding=padding)
    assert df["timestamp"].tolist() == format_timestamps(table["time"][rows]).tolist()
    assert df["prediction"].tolist() == expected_prediction(np.array(rows))
    assert (df["segment"] == 0).all()
    X = np.concatenate(calls)
    if padding == "zero":
        assert (X[2, 2:] == 0).all()  # two zero windows after rows 8, 9
    if padding == "wrap":
        assert X[2, :, 0, 0].tolist() == [7, 8, 9, 10]  # rows 6..9 (value = row + 1)


def test_wrap_keeps_only_new_predictions() -> None:
    # A model whose output depends on the sequence position shows which step was written.
    table = make_table(10)

    def position(X: np.ndarray) -> np.ndarray:
        return np.broadcast_to((np.arange(X.shape[1]) >= 2).astype(np.int64), X.shape[:2]).copy()

    df = predict_subject(table, position, window_size=4, padding="wrap")
    # chunks [0-3] [4-7] [6,7,8,9]: written steps 0..3, 0..3, and the last two of the wrap chunk.
    assert df["prediction"].tolist() == ["sitting"] * 2 + ["not-sitting"] * 2 + ["sitting"] * 2 + [
        "not-sitting"
    ] * 4


def test_output_forms_and_batching_agree() -> None:
    table = make_table(40, sleeping=[13], non_wear=[27, 28])
    ref = predict_subject(table, parity_ids, window_size=5, padding="zero")
    as_probs = predict_subject(table, parity_probs, window_size=5, padding="zero")
    as_one = predict_subject(table, lambda X: parity_probs(X)[..., 1:], window_size=5, padding="zero")
    as_float = predict_subject(table, lambda X: parity_probs(X)[..., 1], window_size=5, padding="zero")
    sizes: list[int] = []

    def counting(X: np.ndarray) -> np.ndarray:
        sizes.append(X.shape[0])
        return parity_ids(X)

    batched = predict_subject(table, counting, window_size=5, padding="zero", batch_size=2)
    for other in (as_probs, as_one, as_float, batched):
        pd.testing.assert_frame_equal(ref, other)
    assert max(sizes) == 2 and sum(sizes) == 9  # segments of 13, 13, 11 windows: 3 chunks each
    assert ref["segment"].unique().tolist() == [0, 1, 2]
    assert not set(ref["timestamp"]) & set(format_timestamps(table["time"][[13, 27, 28]]))


def test_to_class_ids_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        to_class_ids(np.zeros((2, 3, 2)), (2, 4))
    assert to_class_ids(np.array([[0.2, 0.7]]), (1, 2)).tolist() == [[0, 1]]


def test_unknown_class_id_raises() -> None:
    with pytest.raises(ValueError, match="no name"):
        predict_subject(make_table(4), lambda X: np.full(X.shape[:2], 2), window_size=2)


def test_nothing_predictable_gives_header_only(tmp_path) -> None:
    table = make_table(6, sleeping=range(6))
    df = predict_subject(table, parity_ids, window_size=2, include_label=True)
    assert df.empty and list(df.columns) == ["segment", "timestamp", "label", "prediction"]
    write_csv(df, tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text() == "segment,timestamp,label,prediction\n"


def test_more_than_one_subject_is_refused() -> None:
    a, b = make_table(4), make_table(4, subject="s2")
    both = {k: np.concatenate([a[k], b[k]]) for k in a}
    with pytest.raises(ValueError, match="one subject"):
        predict_subject(both, parity_ids, window_size=2)


@pytest.fixture
def los_angeles():
    """Process-local zone America/Los_Angeles for one test, restored afterwards."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/Los_Angeles"
    _time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    _time.tzset()


def test_local_time_matches_deeppostures_fromtimestamp_across_dst(los_angeles) -> None:
    # 2024-03-10 and 2024-11-03: the US DST changes, 00:00-06:00 local.
    starts = [int(datetime(2024, 3, 10).timestamp()), int(datetime(2024, 11, 3).timestamp())]
    t = np.concatenate([s + 10 * np.arange(6 * 360) for s in starts])
    expected = [datetime.fromtimestamp(x).strftime("%Y-%m-%d %H:%M:%S") for x in t]
    assert format_timestamps(t, timezone=None).tolist() == expected
    # UTC (the default) does not depend on the process zone.
    assert format_timestamps(np.array([T0]))[0] == "2024-01-01 23:59:30"
    assert format_timestamps(np.array([T0]), "Europe/Berlin")[0] == "2024-01-02 00:59:30"


def test_write_csv_replaces_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    path = tmp_path / "out" / "s1.csv"
    write_csv(pd.DataFrame({"a": [1]}), path)
    write_csv(pd.DataFrame({"b": [2, 3]}), path)
    assert path.read_text() == "b\n2\n3\n"
    assert os.listdir(path.parent) == ["s1.csv"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        write_csv(pd.DataFrame({"c": [4]}), path)
    assert path.read_text() == "b\n2\n3\n"  # old content intact
    assert os.listdir(path.parent) == ["s1.csv"]  # temp file removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_chap_and_sequences_do_not_import_tensorflow() -> None:
    code = (
        "import sys, cerebro_tasks.deeppostures.chap, cerebro_tasks.deeppostures.sequences; "
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


# ---------------------------------------------------------------- a CHAP-style ensemble


def test_ensemble_majority_vote_with_members_of_different_windows() -> None:
    from cerebro_tasks.deeppostures.chap import predict_subject_ensemble

    table = make_table(12)

    def always(c: int):
        return lambda X: np.full(X.shape[:2], c, dtype=np.int64)

    # Three members, T = 3, 4, 5; with padding drop each writes the windows of its full chunks:
    # 12 (T=3), 12 (T=4), 10 (T=5). Written: the windows every member predicted.
    df = predict_subject_ensemble(table, [(always(1), 3), (always(0), 4), (always(1), 5)])
    assert len(df) == 10 and set(df["prediction"]) == {"not-sitting"}  # two of three say 1
    df = predict_subject_ensemble(table, [(always(0), 3), (parity_ids, 4), (always(1), 5)], padding="zero")
    assert len(df) == 12  # with zero padding every member predicts every window
    assert df["prediction"].tolist() == expected_prediction(np.arange(12))  # the parity member sides with one of the other two
    # Three classes, three different votes: the best-ranked member (listed first) decides.
    names = {0: "sitting", 1: "standing", 2: "stepping", -1: "no-label"}
    df = predict_subject_ensemble(table, [(always(2), 4), (always(0), 4), (always(1), 4)], label_map=names)
    assert set(df["prediction"]) == {"stepping"}
    # One member: exactly predict_subject.
    pd.testing.assert_frame_equal(predict_subject_ensemble(table, [(parity_ids, 4)]),
                                  predict_subject(table, parity_ids, window_size=4))
    with pytest.raises(ValueError, match="at least one"):
        predict_subject_ensemble(table, [])


def test_timestamps_print_the_studys_wall_clock() -> None:
    # 2024-07-01 00:00:00 wall clock, as mktime made it in Los Angeles (PDT, UTC-7) and Sydney (AEST, UTC+10)
    for zone, epoch in (("America/Los_Angeles", 1_719_817_200), ("Australia/Sydney", 1_719_756_000),
                        ("UTC", 1_719_792_000)):
        assert format_timestamps(np.array([epoch, epoch + 10]), zone).tolist() == [
            "2024-07-01 00:00:00", "2024-07-01 00:00:10"]
