"""H5 -> windows dataset: round trip, one test per bad input, incremental runs, publishing."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from cerebro_tasks.deeppostures import h5format
from cerebro_tasks.deeppostures import petastorm_io as pio
from cerebro_tasks.deeppostures.convert import ConversionError, convert
from cerebro_tasks.deeppostures.synth import synthesize

pytestmark = pytest.mark.slow


def _h5_days(root: str) -> list[h5format.H5Day]:
    return [h5format.read_h5(path, subject, date) for subject, date, path in h5format.list_h5_files(root)]


def _assert_dataset_equals_h5(got: dict[str, np.ndarray], days: list[h5format.H5Day]) -> None:
    """Every window of every H5 file equals the row read back, in (subject, time) order."""
    assert len(got["time"]) == sum(d.num_windows for d in days)
    start = 0
    for day in days:
        rows = slice(start, start + day.num_windows)
        assert (got["id"][rows] == day.subject).all()
        assert np.array_equal(got["time"][rows], day.time.astype(np.int64))
        assert np.array_equal(got["data"][rows], day.data.astype(np.float32))
        for name in ("non_wear", "sleeping", "label"):
            assert np.array_equal(got[name][rows], getattr(day, name))
        start += day.num_windows


@pytest.fixture(scope="module")
def converted(spark, h5_tree, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("converted") / "windows")
    report = convert(h5_tree, url, spark=spark)
    return url, report


# ------------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------------


def test_round_trip_read_windows(converted, h5_tree):
    url, report = converted
    days = _h5_days(h5_tree)
    assert report["files"]["converted"] == len(days) and report["quarantine"] == []
    assert report["windows"]["total"] == sum(d.num_windows for d in days)
    _assert_dataset_equals_h5(pio.read_windows(url), days)


def test_round_trip_petastorm_row_reader(converted, h5_tree):
    url, _ = converted
    with pio.make_row_reader(url, workers_count=1) as reader:
        rows = list(reader)
    got = {name: np.array([getattr(r, name) for r in rows]) for name in pio.FIELDS}
    got["id"] = got["id"].astype(object)
    order = np.lexsort((got["time"], got["id"].astype(str)))
    _assert_dataset_equals_h5({k: v[order] for k, v in got.items()}, _h5_days(h5_tree))


def test_round_trip_petastorm_batch_reader(converted, h5_tree):
    url, _ = converted
    with pio.make_batch_reader(url, workers_count=2) as reader:
        batches = [pio.decode_batch(b) for b in reader]
    got = {k: np.concatenate([b[k] for b in batches]) for k in pio.FIELDS}
    order = np.lexsort((got["time"], got["id"].astype(str)))
    _assert_dataset_equals_h5({k: v[order] for k, v in got.items()}, _h5_days(h5_tree))


def test_layout_manifest_and_schema(converted):
    url, report = converted
    names = sorted(os.listdir(url))
    assert "_cerebro_manifest.json" in names and "_common_metadata" in names
    assert "_staging" not in names  # nothing left behind
    parts = [n for n in names if n.startswith("part-")]
    assert len(parts) == report["files"]["converted"]
    unischema, row_groups, schema = pio.read_petastorm_metadata(url)
    assert sorted(row_groups) == parts
    assert [(f.name, f.shape) for f in unischema.fields.values()] == [
        ("id", ()), ("time", ()), ("data", (100, 3)), ("non_wear", ()), ("sleeping", ()), ("label", ())]
    assert report["peak_task_memory_mb"]["worker_maxrss_max"] > 0


# ------------------------------------------------------------------------------------------------
# bad inputs: one per case, each with its exact error; the good files still convert
# ------------------------------------------------------------------------------------------------

BAD_CASES = {
    # subject folder -> (what to do to its one file, field, exact problem)
    "Bmissing": ("missing", "sleeping",
                 "expected a dataset named 'sleeping', found none (file has: data, label, non_wear, time)"),
    "Bdtype": ("dtype", "label", "expected an integer dtype (int64), found float64"),
    "Bshape": ("shape", "data", "expected shape (N, 100, 3), found (60, 50, 3)"),
    "Bstep": ("step", "time", "expected consecutive windows exactly 10 s apart, found 15 s between window 9 "
              "and window 10"),
    "Blabel": ("label", "label", "expected values in {-1, 0, 1}, found 2 at window 5"),
    "Bflag": ("flag", "non_wear", "expected values in {0, 1}, found 3 at window 7"),
    "Bsleep": ("sleep", "sleeping", "expected values in {0, 1}, found -1 at window 3"),
    "Bnan": ("nan", "data", "expected finite values, found nan at window 4 (sample 10, axis 1)"),
    "Bnoth5": ("noth5", "file", None),  # problem text comes from HDF5; checked by prefix
    # datasets that declare 10^8 windows (about 120 GB of data) in a file of a few KB
    "Bhuge": ("huge", "time", "expected at most 9000 windows (a 25-hour day of 10 s windows), found datasets "
              "of 100000000"),
}


def _write_bad(root: str, subject: str, kind: str, base: dict[str, np.ndarray]) -> str:
    arrays = {k: v.copy() for k, v in base.items()}
    if kind == "missing":
        del arrays["sleeping"]
    elif kind == "dtype":
        arrays["label"] = arrays["label"].astype(np.float64)
    elif kind == "shape":
        arrays["data"] = arrays["data"][:, :50, :]
    elif kind == "step":
        arrays["time"][10:] += 5
    elif kind == "label":
        arrays["label"][5] = 2
    elif kind == "flag":
        arrays["non_wear"][7] = 3
    elif kind == "sleep":
        arrays["sleeping"][3] = -1
    elif kind == "nan":
        arrays["data"][4, 10, 1] = np.nan
    path = os.path.join(root, subject, "2024-03-04.h5")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "noth5":
        with open(path, "wb") as f:
            f.write(b"this is not an HDF5 file")
        return path
    if kind == "huge":
        with h5py.File(path, "w") as f:
            for name, value in arrays.items():  # chunks never written take no space
                d = f.create_dataset(name, shape=(10 ** 8,) + value.shape[1:], dtype=value.dtype,
                                     chunks=(1024,) + value.shape[1:])
                d[: len(value)] = value
        return path
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)
    return path


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """Two good subjects plus one subject per bad case, and layout problems."""
    root = str(tmp_path_factory.mktemp("bad") / "study")
    synthesize(root, subjects=2, days=2, seed=3, windows_per_day=60)
    good = h5format.read_h5(os.path.join(root, "S0001", "2024-03-04.h5"))
    base = {k: getattr(good, k) for k in ("time", "data", "non_wear", "sleeping", "label")}
    paths = {subject: _write_bad(root, subject, kind, base) for subject, (kind, _, _) in BAD_CASES.items()}
    # consecutive dates: a gap between day 1 and day 3 (day 1 kept, day 3 refused)
    synthesize(os.path.join(root, "_gap_src"), subjects=1, days=3, seed=4, windows_per_day=60)
    os.makedirs(os.path.join(root, "Bgap"))
    for day in ("2024-03-04", "2024-03-06"):
        shutil.copy(os.path.join(root, "_gap_src", "S0001", f"{day}.h5"), os.path.join(root, "Bgap", f"{day}.h5"))
    shutil.rmtree(os.path.join(root, "_gap_src"))
    paths["Bgap"] = os.path.join(root, "Bgap", "2024-03-06.h5")
    # unsafe subject id (a dot) and a file not named <YYYY-MM-DD>.h5
    os.makedirs(os.path.join(root, "bad.id"))
    shutil.copy(os.path.join(root, "S0001", "2024-03-04.h5"), os.path.join(root, "bad.id", "2024-03-04.h5"))
    shutil.copy(os.path.join(root, "S0001", "2024-03-04.h5"), os.path.join(root, "S0002", "notes.h5"))
    return root, paths


@pytest.fixture(scope="module")
def bad_report(spark, bad_tree, tmp_path_factory):
    root, _ = bad_tree
    url = str(tmp_path_factory.mktemp("badout") / "windows")
    return convert(root, url, spark=spark), url


def _quarantined(report: dict, path: str) -> dict:
    matches = [q for q in report["quarantine"] if q["path"] == path]
    assert len(matches) == 1, (path, report["quarantine"])
    return matches[0]


@pytest.mark.parametrize("subject", sorted(BAD_CASES))
def test_bad_file_is_quarantined_with_its_exact_error(bad_report, bad_tree, subject):
    report, _ = bad_report
    _, paths = bad_tree
    _, field, problem = BAD_CASES[subject]
    record = _quarantined(report, paths[subject])
    assert record["field"] == field
    if problem is None:
        assert record["problem"].startswith("expected a readable HDF5 file, found: ")
    else:
        assert record["problem"] == problem


def test_gap_in_dates_refuses_the_days_after_it(bad_report, bad_tree):
    report, url = bad_report
    _, paths = bad_tree
    record = _quarantined(report, paths["Bgap"])
    assert record == {"path": paths["Bgap"], "field": "date",
                      "problem": "expected 2024-03-05 after 2024-03-04, found 2024-03-06"}
    got = pio.read_windows(url, columns=["id"])
    assert (got["id"] == "Bgap").sum() == 60  # the day before the gap is kept


def test_unsafe_subject_id_and_bad_file_name(bad_report, bad_tree):
    report, _ = bad_report
    root, _ = bad_tree
    record = _quarantined(report, os.path.join(root, "bad.id"))
    assert record["field"] == "subject"
    assert record["problem"] == "expected no '.' in the subject id, found 'bad.id' (subject folder name)"
    record = _quarantined(report, os.path.join(root, "S0002", "notes.h5"))
    assert record == {"path": os.path.join(root, "S0002", "notes.h5"), "field": "path",
                      "problem": "expected a file named <YYYY-MM-DD>.h5, found 'notes.h5'"}


def test_good_files_still_convert_and_quarantine_report_is_written(bad_report):
    report, url = bad_report
    assert report["files"]["converted"] == 4 + 1  # S0001, S0002 x 2 days, Bgap day 1
    assert report["files"]["quarantined"] == len(BAD_CASES) + 3
    assert sorted(set(pio.read_windows(url, columns=["id"])["id"])) == ["Bgap", "S0001", "S0002"]
    import json

    with open(os.path.join(url, "_cerebro_quarantine.json")) as f:
        assert json.load(f) == report["quarantine"]


def test_rerun_with_the_same_bad_files_reads_nothing_and_reports_them_again(spark, bad_report, bad_tree):
    report, url = bad_report
    root, _ = bad_tree
    again = convert(root, url, spark=spark)
    assert again["files"]["converted"] == 0 and again["bytes_read"] == 0
    assert again["quarantine"] == report["quarantine"]
    assert again["version"] == report["version"]


def test_fail_fast_raises_the_first_error_and_publishes_nothing(spark, bad_tree, tmp_path):
    root, paths = bad_tree
    url = str(tmp_path / "windows")
    with pytest.raises(h5format.H5FormatError) as info:
        convert(root, url, spark=spark, fail_fast=True)
    # Layout problems are found on the driver before any file is read: the first by path.
    assert info.value.path == os.path.join(root, "Bgap", "2024-03-06.h5")
    assert info.value.field == "date"
    assert not os.path.exists(os.path.join(url, "_cerebro_manifest.json"))


def test_fail_fast_content_error_comes_back_as_h5formaterror(spark, tmp_path, h5_tree):
    root = str(tmp_path / "study")
    shutil.copytree(h5_tree, root)
    good = h5format.read_h5(os.path.join(root, "S0001", "2024-03-04.h5"))
    base = {k: getattr(good, k) for k in ("time", "data", "non_wear", "sleeping", "label")}
    path = _write_bad(root, "Blabel", "label", base)
    url = str(tmp_path / "windows")
    with pytest.raises(h5format.H5FormatError) as info:
        convert(root, url, spark=spark, fail_fast=True)
    assert (info.value.path, info.value.field, info.value.problem) == (
        path, "label", "expected values in {-1, 0, 1}, found 2 at window 5")
    assert not any(n.startswith("part-") for n in os.listdir(url)) if os.path.isdir(url) else True
    assert not os.path.exists(os.path.join(url, "_cerebro_manifest.json"))


# ------------------------------------------------------------------------------------------------
# incremental runs
# ------------------------------------------------------------------------------------------------


def _part_stats(url: str) -> dict[str, tuple[int, int]]:
    return {n: (os.stat(os.path.join(url, n)).st_ino, os.stat(os.path.join(url, n)).st_mtime_ns)
            for n in os.listdir(url) if n.startswith("part-")}


def test_incremental_noop_new_subject_changed_and_deleted_file(spark, h5_tree_copy, tmp_path):
    root, url = h5_tree_copy, str(tmp_path / "windows")
    first = convert(root, url, spark=spark)
    assert first["files"]["converted"] == 8 and first["version"] == 1

    # 1. no-op: nothing read, nothing written, same version
    before = _part_stats(url)
    manifest_mtime = os.stat(os.path.join(url, "_cerebro_manifest.json")).st_mtime_ns
    noop = convert(root, url, spark=spark)
    assert noop["files"] == {"listed": 8, "converted": 0, "skipped": 8, "unchanged_content": 0,
                             "removed": 0, "quarantined": 0}
    assert noop["version"] == 1 and noop["bytes_read"] == 0
    assert _part_stats(url) == before
    assert os.stat(os.path.join(url, "_cerebro_manifest.json")).st_mtime_ns == manifest_mtime

    # 2. a new subject (backfill): only its files convert, old parts untouched
    synthesize(str(tmp_path / "more"), subjects=5, days=2, seed=7, windows_per_day=120)
    shutil.copytree(str(tmp_path / "more" / "S0005"), os.path.join(root, "S0005"))
    added = convert(root, url, spark=spark)
    assert added["files"]["converted"] == 2 and added["files"]["skipped"] == 8
    after = _part_stats(url)
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == 10
    assert added["version"] == 2

    # 3. a changed file: re-converted, its old part gone, the new content read back
    path = os.path.join(root, "S0002", "2024-03-05.h5")
    with h5py.File(path, "r+") as f:
        f["label"][0] = 1 - f["label"][0] if f["label"][0] in (0, 1) else 0
    changed = convert(root, url, spark=spark, superseded_grace_s=0)  # no reader to wait for
    assert changed["files"]["converted"] == 1 and changed["files"]["skipped"] == 9
    assert len(_part_stats(url)) == 10
    _assert_dataset_equals_h5(pio.read_windows(url), _h5_days(root))

    # 4. same content, new mtime: re-hashed, not re-converted
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    touched = convert(root, url, spark=spark)
    assert touched["files"]["converted"] == 0 and touched["files"]["unchanged_content"] == 1
    assert touched["version"] == changed["version"]

    # 5. a deleted file (and a deleted subject): gone from the dataset
    shutil.rmtree(os.path.join(root, "S0003"))
    os.remove(os.path.join(root, "S0004", "2024-03-05.h5"))
    removed = convert(root, url, spark=spark, superseded_grace_s=0)
    assert removed["files"]["removed"] == 3 and removed["files"]["converted"] == 0
    assert removed["removed"] == ["S0003/2024-03-04.h5", "S0003/2024-03-05.h5", "S0004/2024-03-05.h5"]
    assert len(_part_stats(url)) == 7
    _assert_dataset_equals_h5(pio.read_windows(url), _h5_days(root))
    _, row_groups, _ = pio.read_petastorm_metadata(url)
    assert sorted(row_groups) == sorted(_part_stats(url))


def test_readers_see_only_committed_parts_and_leftovers_are_cleaned(spark, h5_tree, tmp_path):
    url = str(tmp_path / "windows")
    convert(h5_tree, url, spark=spark)
    want = pio.read_windows(url)
    # What a crash mid-publish leaves: a staged part and a moved-but-uncommitted part.
    stray = os.path.join(url, "part-S0009-2024-03-04-0123456789abcdef.parquet")
    shutil.copy(os.path.join(url, sorted(n for n in os.listdir(url) if n.startswith("part-"))[0]), stray)
    os.makedirs(os.path.join(url, "_staging", "dead-run"))
    shutil.copy(stray, os.path.join(url, "_staging", "dead-run", "x.parquet"))
    got = pio.read_windows(url)  # the manifest is the commit: the stray part is not read
    assert len(got["time"]) == len(want["time"])
    report = convert(h5_tree, url, spark=spark)
    assert report["files"]["converted"] == 0
    assert not os.path.exists(stray) and not os.path.exists(os.path.join(url, "_staging"))
    with pio.make_row_reader(url, workers_count=1) as reader:  # plain Petastorm works again
        assert sum(1 for _ in reader) == len(want["time"])


def test_refuses_to_write_into_a_foreign_folder(spark, h5_tree, tmp_path):
    url = tmp_path / "someone_else"
    url.mkdir()
    (url / "part-00000-abc.snappy.parquet").write_bytes(b"x")
    with pytest.raises(ConversionError, match="expected an empty folder or a dataset made by convert"):
        convert(h5_tree, str(url), spark=spark)
    assert (url / "part-00000-abc.snappy.parquet").exists()


def test_file_url_for_input_and_output(spark, h5_tree, tmp_path):
    url = "file://" + str(tmp_path / "windows")
    report = convert("file://" + h5_tree, url, spark=spark)
    assert report["files"]["converted"] == 8
    _assert_dataset_equals_h5(pio.read_windows(url), _h5_days(h5_tree))


def test_a_second_conversion_of_the_same_dataset_is_refused(tmp_path, h5_tree):
    """The ingest and model-selection DAGs both convert: never two writers at once."""
    from cerebro_tasks.deeppostures.convert import LOCK_NAME, convert
    from cerebro_tasks.storage.store import LockedError, Store

    dataset = Store(str(tmp_path / "dataset"))
    with dataset.lock(LOCK_NAME):
        with pytest.raises(LockedError, match="held by .*pid"):
            convert(h5_tree, dataset.url, lock_wait_s=0.5)
    assert not dataset.exists(LOCK_NAME)  # released


@pytest.mark.slow
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, h5_tree, spark):
    import json
    import socket

    from cerebro_tasks.deeppostures.convert import LOCK_NAME, convert
    from cerebro_tasks.storage.store import Store

    dataset = Store(str(tmp_path / "dataset"))
    dataset.write_bytes(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345}).encode(), LOCK_NAME)
    report = convert(h5_tree, dataset.url, spark=spark)
    assert report["files"]["converted"] > 0 and not dataset.exists(LOCK_NAME)


@pytest.mark.slow
def test_broken_symlinks_in_the_input_are_reported(spark, h5_tree_copy, tmp_path):
    """pyarrow's listing drops them silently: a subject or day would vanish without a word."""
    root = h5_tree_copy
    os.symlink("/nonexistent/study/S0042", os.path.join(root, "S0042"))  # dangling subject folder
    day = os.path.join(root, "S0001", "2024-03-09.h5")
    os.symlink(day, day)  # a loop
    report = convert(root, str(tmp_path / "windows"), spark=spark)
    assert report["files"]["converted"] == 8
    assert _quarantined(report, os.path.join(root, "S0042"))["problem"] == (
        "expected a folder or an H5 file, found a dangling symbolic link (-> /nonexistent/study/S0042)")
    assert _quarantined(report, day)["problem"] == (
        f"expected a folder or an H5 file, found a symbolic link loop (-> {day})")


def test_an_empty_input_folder_is_an_error(tmp_path):
    (tmp_path / "study").mkdir()
    with pytest.raises(h5format.H5FormatError, match="found an empty folder"):
        convert(str(tmp_path / "study"), str(tmp_path / "windows"))
    assert not (tmp_path / "windows" / pio.MANIFEST_NAME).exists()  # nothing published


@pytest.mark.slow
def test_the_convert_lock_beats_so_another_host_can_take_it_over(spark, h5_tree, tmp_path):
    import json
    import threading
    import time

    from cerebro_tasks.deeppostures.convert import LOCK_HEARTBEAT_S, LOCK_NAME

    lock = tmp_path / "windows" / LOCK_NAME
    seen: list[dict] = []

    def watch() -> None:
        while not seen and not done.is_set():
            try:
                seen.append(json.loads(lock.read_bytes()))
            except (OSError, ValueError):
                time.sleep(0.01)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    convert(h5_tree, str(tmp_path / "windows"), spark=spark)
    done.set()
    watcher.join(5)
    assert seen and seen[0]["heartbeat_s"] == LOCK_HEARTBEAT_S and seen[0]["token"]


@pytest.mark.slow
def test_a_reader_on_the_old_manifest_still_reads_every_part_it_lists(spark, h5_tree_copy, tmp_path):
    """A convert that supersedes parts keeps them for the grace period, then a later one deletes them."""
    import json
    import time

    root, url = h5_tree_copy, str(tmp_path / "windows")
    convert(root, url, spark=spark)
    with open(os.path.join(url, pio.MANIFEST_NAME)) as f:
        old_manifest = json.load(f)  # a reader has just read the manifest...
    path = os.path.join(root, "S0002", "2024-03-05.h5")
    with h5py.File(path, "r+") as f:
        f["label"][0] = 1 - f["label"][0] if f["label"][0] in (0, 1) else 0
    os.remove(os.path.join(root, "S0001", "2024-03-05.h5"))
    changed = convert(root, url, spark=spark, superseded_grace_s=1.0)  # ...when another convert commits
    assert changed["files"]["converted"] == 1 and changed["files"]["removed"] == 1
    with open(os.path.join(url, pio.MANIFEST_NAME)) as f:
        new_manifest = json.load(f)
    gone = sorted({e["part"] for e in old_manifest["files"].values()} - {e["part"] for e in new_manifest["files"].values()})
    assert len(gone) == 2 and sorted(new_manifest["superseded"]) == gone
    for e in old_manifest["files"].values():  # every file the old manifest lists is still there
        assert os.path.exists(os.path.join(url, e["part"]))
    _assert_dataset_equals_h5(pio.read_windows(url), _h5_days(root))  # new readers see the new version
    time.sleep(1.1)
    later = convert(root, url, spark=spark, superseded_grace_s=1.0)
    assert later["files"]["converted"] == 0 and later["version"] == changed["version"]
    assert not any(os.path.exists(os.path.join(url, p)) for p in gone)
    with open(os.path.join(url, pio.MANIFEST_NAME)) as f:
        assert json.load(f)["superseded"] == {}
