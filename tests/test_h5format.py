"""Tests for cerebro_tasks.deeppostures.h5format: the DeepPostures H5 format, reading and validation.

Every bad-input case builds a tiny file in tmp_path with h5py and checks the exact message.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle

import h5py
import numpy as np
import pytest

from cerebro_tasks.deeppostures.h5format import (
    DATASETS,
    SAMPLES_PER_WINDOW,
    WINDOW_SECONDS,
    WINDOWS_PER_DAY,
    H5Day,
    H5FormatError,
    list_h5_files,
    read_h5,
    scan_h5_root,
    validate_consecutive_days,
    validate_subject_id,
)

DAY = dt.date(2024, 3, 4)
MIDNIGHT = dt.datetime(2024, 3, 4, tzinfo=dt.timezone.utc).timestamp()
N = 20  # windows in the default test file


def valid_arrays(n: int = N, start: float = MIDNIGHT + 12 * 3600) -> dict[str, np.ndarray]:
    """A small, valid day: noon onwards, a mix of labels and flags."""
    rng = np.random.default_rng(0)
    return {
        "time": start + WINDOW_SECONDS * np.arange(n, dtype=np.float64),
        "data": rng.normal(0.0, 0.1, size=(n, SAMPLES_PER_WINDOW, 3)),
        "non_wear": (np.arange(n) % 7 == 0).astype(np.int64),
        "sleeping": (np.arange(n) % 5 == 0).astype(np.int64),
        "label": (np.arange(n) % 3 - 1).astype(np.int64),
    }


def write_file(path: str, arrays: dict[str, np.ndarray | None]) -> str:
    """Write datasets as given (None leaves one out), making folders as needed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as h5:
        for name, values in arrays.items():
            if values is not None:
                h5.create_dataset(name, data=values)
    return path


@pytest.fixture
def day_path(tmp_path) -> str:
    """Where a test's file goes: <tmp>/S0001/2024-03-04.h5."""
    return str(tmp_path / "S0001" / "2024-03-04.h5")


def bad_file(day_path: str, **changes) -> str:
    """A valid file with some datasets replaced (or removed with None)."""
    arrays = valid_arrays()
    arrays.update(changes)
    return write_file(day_path, arrays)


def expect_error(path: str, field: str, problem: str) -> H5FormatError:
    """read_h5 must fail with exactly this field and problem (and the path in front)."""
    with pytest.raises(H5FormatError) as info:
        read_h5(path)
    err = info.value
    assert (err.path, err.field, err.problem) == (path, field, problem)
    assert str(err) == f"{path}: field '{field}': {problem}"
    return err


# --- constants and a good file ----------------------------------------------------------------


def test_constants_match_the_reference():
    assert list(DATASETS) == ["time", "data", "non_wear", "sleeping", "label"]
    assert DATASETS["time"] == (np.dtype("float64"), ())
    assert DATASETS["data"] == (np.dtype("float64"), (100, 3))
    for name in ("non_wear", "sleeping", "label"):
        assert DATASETS[name] == (np.dtype("int64"), ())
    assert (WINDOW_SECONDS, SAMPLES_PER_WINDOW, WINDOWS_PER_DAY) == (10, 100, 8640)


def test_read_valid_file_defaults_subject_and_date_from_path(day_path):
    arrays = valid_arrays()
    write_file(day_path, arrays)
    day = read_h5(day_path)
    assert isinstance(day, H5Day)
    assert (day.subject, day.date, day.path, day.num_windows) == ("S0001", DAY, day_path, N)
    for name, (dtype, trailing) in DATASETS.items():
        values = getattr(day, name)
        assert values.dtype == dtype and values.shape == (N, *trailing)
        np.testing.assert_array_equal(values, arrays[name])


def test_explicit_subject_and_date_override_the_path(tmp_path):
    path = write_file(str(tmp_path / "x" / "whatever.h5"), valid_arrays())
    day = read_h5(path, subject="P7", date="2024-03-04")
    assert (day.subject, day.date) == ("P7", DAY)
    assert read_h5(path, subject="P7", date=dt.datetime(2024, 3, 4, 9)).date == DAY


def test_narrower_dtypes_are_accepted_and_widened(day_path):
    arrays = valid_arrays()
    narrow = {k: v.astype(np.float32 if v.dtype.kind == "f" else np.int8)
              for k, v in arrays.items()}
    narrow["time"] = arrays["time"]  # float32 cannot hold epoch seconds exactly
    write_file(day_path, narrow)
    day = read_h5(day_path)
    assert day.data.dtype == np.float64 and day.label.dtype == np.int64
    np.testing.assert_array_equal(day.label, arrays["label"])


def test_window_starts_may_fill_the_whole_day(day_path):
    write_file(day_path, valid_arrays(n=WINDOWS_PER_DAY, start=MIDNIGHT))
    assert read_h5(day_path).num_windows == WINDOWS_PER_DAY


def test_validate_false_skips_value_checks(day_path):
    bad_file(day_path, label=np.full(N, 7, dtype=np.int64))
    assert read_h5(day_path, validate=False).label[0] == 7


# --- one test per bad input -------------------------------------------------------------------


def test_missing_dataset(day_path):
    bad_file(day_path, label=None)
    expect_error(day_path, "label", "expected a dataset named 'label', found none "
                 "(file has: data, non_wear, sleeping, time)")


def test_missing_datasets_are_all_named(day_path):
    bad_file(day_path, sleeping=None, label=None)
    expect_error(day_path, "sleeping, label", "expected datasets named 'sleeping', 'label', "
                 "found none (file has: data, non_wear, time)")


def test_missing_dataset_fails_even_without_validation(day_path):
    bad_file(day_path, time=None)
    with pytest.raises(H5FormatError, match="field 'time': expected a dataset named 'time'"):
        read_h5(day_path, validate=False)


def test_group_instead_of_dataset(day_path):
    bad_file(day_path, label=None)
    with h5py.File(day_path, "a") as h5:
        h5.create_group("label")
    expect_error(day_path, "label", "expected a dataset, found Group")


def test_wrong_dtype_kind_integer_field(day_path):
    bad_file(day_path, label=valid_arrays()["label"].astype(np.float64))
    expect_error(day_path, "label", "expected an integer dtype (int64), found float64")


def test_wrong_dtype_kind_float_field(day_path):
    bad_file(day_path, data=np.zeros((N, 100, 3), dtype=np.int64))
    expect_error(day_path, "data", "expected a floating-point dtype (float64), found int64")


def test_wrong_shape_of_data(day_path):
    bad_file(day_path, data=np.zeros((N, 100, 2)))
    expect_error(day_path, "data", "expected shape (N, 100, 3), found (20, 100, 2)")


def test_wrong_rank_of_a_flag(day_path):
    bad_file(day_path, sleeping=np.zeros((N, 1), dtype=np.int64))
    expect_error(day_path, "sleeping", "expected shape (N,), found (20, 1)")


def test_mismatched_lengths(day_path):
    bad_file(day_path, non_wear=np.zeros(N - 1, dtype=np.int64))
    expect_error(day_path, "non_wear", "expected 20 windows (the length of 'time'), found 19")


def test_no_windows(day_path):
    write_file(day_path, valid_arrays(n=0))
    expect_error(day_path, "time", "expected at least 1 window, found 0")


def test_bad_time_step_names_the_first_bad_index(day_path):
    time = valid_arrays()["time"]
    time[5:] += 10.0  # one window missing between 4 and 5
    time[9:] += 0.5
    bad_file(day_path, time=time)
    expect_error(day_path, "time", "expected consecutive windows exactly 10 s apart, "
                 "found 20 s between window 4 and window 5")


def test_non_finite_time(day_path):
    time = valid_arrays()["time"]
    time[3] = np.nan
    bad_file(day_path, time=time)
    expect_error(day_path, "time", "expected finite epoch seconds, found nan at window 3")


def test_time_outside_the_files_date(day_path):
    write_file(day_path, valid_arrays(start=MIDNIGHT + 86_400 - 5 * WINDOW_SECONDS))
    expect_error(day_path, "time", "expected window starts within 2024-03-04 (UTC), "
                 "found 2024-03-05 00:00:00 at window 5")


def test_time_before_the_files_date(day_path):
    write_file(day_path, valid_arrays(start=MIDNIGHT - WINDOW_SECONDS))
    expect_error(day_path, "time", "expected window starts within 2024-03-04 (UTC), "
                 "found 2024-03-03 23:59:50 at window 0")


def test_label_out_of_set(day_path):
    label = np.zeros(N, dtype=np.int64)
    label[17] = 2
    bad_file(day_path, label=label)
    expect_error(day_path, "label", "expected values in {-1, 0, 1}, found 2 at window 17")


@pytest.mark.parametrize("field", ["non_wear", "sleeping"])
def test_flag_out_of_set(day_path, field):
    flags = np.zeros(N, dtype=np.int64)
    flags[3] = -1
    bad_file(day_path, **{field: flags})
    expect_error(day_path, field, "expected values in {0, 1}, found -1 at window 3")


def test_nan_data(day_path):
    data = valid_arrays()["data"]
    data[6, 42, 2] = np.nan
    data[8, 0, 0] = np.inf
    bad_file(day_path, data=data)
    expect_error(day_path, "data", "expected finite values, found nan at window 6 "
                 "(sample 42, axis 2)")


def test_unsafe_subject_folder_is_rejected_by_read(tmp_path):
    path = write_file(str(tmp_path / "-S1" / "2024-03-04.h5"), valid_arrays())
    expect_error(path, "subject", "expected a subject id not starting with '-', found '-S1'")


def test_file_name_must_be_a_date_unless_given(tmp_path):
    path = write_file(str(tmp_path / "S1" / "day1.h5"), valid_arrays())
    expect_error(path, "path", "expected a file named <YYYY-MM-DD>.h5 (or an explicit date), "
                 "found 'day1.h5'")


def test_bad_explicit_date(day_path):
    write_file(day_path, valid_arrays())
    with pytest.raises(H5FormatError) as info:
        read_h5(day_path, date="04/03/2024")
    assert info.value.field == "date"
    assert info.value.problem == "expected an ISO date YYYY-MM-DD, found '04/03/2024'"


# --- subject ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("subject, problem", [
    ("", "expected a non-empty subject id, found ''"),
    ("../etc", "expected no '/' in the subject id, found '../etc'"),
    ("a/b", "expected no '/' in the subject id, found 'a/b'"),
    ("a\\b", "expected no '\\\\' in the subject id, found 'a\\\\b'"),
    ("S1.bak", "expected no '.' in the subject id, found 'S1.bak'"),
    ("a\x00b", "expected no '\\x00' in the subject id, found 'a\\x00b'"),
    ("-rf", "expected a subject id not starting with '-', found '-rf'"),
    ("a\tb", "expected only printable characters, found 'a\\tb'"),
    (" S1", "expected no leading or trailing whitespace, found ' S1'"),
    ("x" * 129, f"expected at most 128 characters, found '{'x' * 129}'"),
    (7, "expected a str subject id, found 7"),
])
def test_unsafe_subject_id(subject, problem):
    with pytest.raises(H5FormatError) as info:
        validate_subject_id(subject)
    assert (info.value.path, info.value.field, info.value.problem) == ("", "subject", problem)
    assert str(info.value) == f"field 'subject': {problem}"


@pytest.mark.parametrize("subject", ["S0001", "subj_01-A", "1001", "x" * 128, "Ana María"])
def test_safe_subject_id(subject):
    validate_subject_id(subject)


# --- listing and consecutive days -------------------------------------------------------------


def make_tree(root, names: list[str]) -> None:
    """Empty files (content is not read by listing) at the given relative paths."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_list_h5_files_sorted_by_subject_then_date(tmp_path):
    make_tree(tmp_path, ["S2/2024-03-04.h5", "S1/2024-03-05.h5", "S1/2024-03-04.h5",
                         "S10/2023-12-31.h5", ".hidden/x.txt", "S1/.2024-03-06.h5.tmp-12"])
    got = list_h5_files(str(tmp_path))
    assert got == [
        ("S1", dt.date(2024, 3, 4), str(tmp_path / "S1" / "2024-03-04.h5")),
        ("S1", dt.date(2024, 3, 5), str(tmp_path / "S1" / "2024-03-05.h5")),
        ("S10", dt.date(2023, 12, 31), str(tmp_path / "S10" / "2023-12-31.h5")),
        ("S2", dt.date(2024, 3, 4), str(tmp_path / "S2" / "2024-03-04.h5")),
    ]
    assert list_h5_files(str(tmp_path / "S1" / "..")) == [
        (s, d, p.replace(str(tmp_path), str(tmp_path / "S1" / ".."))) for s, d, p in got]


def test_list_h5_files_rejects_a_stray_file(tmp_path):
    make_tree(tmp_path, ["S1/2024-03-04.h5", "S1/notes.txt", "S2/2024-3-4.h5"])
    with pytest.raises(H5FormatError) as info:
        list_h5_files(str(tmp_path))
    path = str(tmp_path / "S1" / "notes.txt")
    assert (info.value.path, info.value.field) == (path, "path")
    assert info.value.problem == ("expected a file named <YYYY-MM-DD>.h5, found 'notes.txt' "
                                  "(1 more unexpected entries)")


def test_scan_h5_root_returns_strays_separately(tmp_path):
    make_tree(tmp_path, ["S1/2024-03-04.h5", "S1/2024-02-30.h5", "top.h5", "S1.bak/2024-03-04.h5",
                         "S1/sub/2024-03-05.h5"])
    files, rejected = scan_h5_root(str(tmp_path))
    assert files == [("S1", dt.date(2024, 3, 4), str(tmp_path / "S1" / "2024-03-04.h5"))]
    assert rejected == sorted([
        (str(tmp_path / "S1" / "2024-02-30.h5"), "expected a file named <YYYY-MM-DD>.h5"),
        (str(tmp_path / "S1" / "sub"), "expected a file named <YYYY-MM-DD>.h5"),
        (str(tmp_path / "S1.bak"), "expected no '.' in the subject id (subject folder name)"),
        (str(tmp_path / "top.h5"), "expected a subject folder, found a file"),
    ])


def test_listing_a_missing_root(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(H5FormatError, match="field 'path': expected a directory"):
        list_h5_files(missing)
    assert list_h5_files(str(tmp_path)) == []


def test_consecutive_days_pass():
    days = [(dt.date(2024, 2, 28) + dt.timedelta(days=i), f"/r/S1/{i}.h5") for i in range(3)]
    validate_consecutive_days(days)  # across 2024-02-29 and into March
    validate_consecutive_days(days[:1])
    validate_consecutive_days([])


def test_gap_between_days():
    days = [(dt.date(2024, 3, 4), "/r/S1/2024-03-04.h5"),
            (dt.date(2024, 3, 6), "/r/S1/2024-03-06.h5")]
    with pytest.raises(H5FormatError) as info:
        validate_consecutive_days(days)
    assert str(info.value) == ("/r/S1/2024-03-06.h5: field 'date': "
                               "expected 2024-03-05 after 2024-03-04, found 2024-03-06")


def test_duplicate_day():
    days = [(dt.date(2024, 3, 4), "a"), (dt.date(2024, 3, 4), "b")]
    with pytest.raises(H5FormatError, match="^b: field 'date': expected 2024-03-05 after "):
        validate_consecutive_days(days)


def test_error_is_a_value_error_and_pickles():
    err = H5FormatError("/x/2024-03-04.h5", "label", "expected values in {-1, 0, 1}, found 2")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.field, back.problem, str(back)) == (
        err.path, err.field, err.problem, str(err))
