"""Validated, incremental conversion of DeepPostures H5 day files into the windows dataset.

``convert(h5_root, dataset_url)`` is one Spark job with one task per H5 file: the executor reads
the file (never the driver), validates it (:func:`cerebro_tasks.deeppostures.h5format.read_h5`), encodes
its windows (:mod:`cerebro_tasks.deeppostures.petastorm_io`) and writes one Parquet file, so memory per
task is one day (about 21 MB of float64 in, 11 MB of float32 out) whatever the study's size.

Dataset layout (``<dataset_url>``)::

    _cerebro_manifest.json               the commit record: every converted file and its part
    _cerebro_quarantine.json             the files that failed validation, with the reasons
    _common_metadata                     Petastorm metadata (unischema, row groups per file)
    part-<subject>-<date>-<fp>.parquet   one per H5 day file, immutable, named by its content
    _staging/<run>/                      parts being written by a running conversion

Incremental: the manifest remembers each H5 file's size, modification time and content
fingerprint (SHA-256 of its converted windows, see :func:`content_fingerprint`). A re-run
lists the tree and compares: same size and mtime -> skipped without reading; new -> converted;
size or mtime changed -> the executor reads it again and re-converts only if the content changed;
gone -> its part leaves the dataset. ``verify=True`` re-reads every file (for filesystems whose
mtimes cannot be trusted). Old parts are never rewritten: a backfill adds parts.

Publishing (what a reader opening the dataset mid-conversion sees):

1. executors write new parts under ``_staging/`` (names starting with ``_`` are invisible to
   Parquet and Petastorm readers);
2. the driver moves them beside the live parts (new, content-derived names: nothing is
   overwritten), then replaces ``_cerebro_manifest.json`` by rename: **the commit**. Project
   readers (:func:`petastorm_io.read_windows`, the split) read exactly the parts the manifest
   lists, so they see the previous version or the new one, whole;
3. it deletes the superseded parts and rewrites ``_common_metadata`` for plain Petastorm readers
   of the folder, which see a consistent dataset at rest; one that opens the folder while steps
   2-3 run fails loudly (Petastorm refuses parts missing from ``_common_metadata``) rather than
   reading a mix. A crash anywhere leaves the last commit readable; the next run removes
   leftovers (staging folders, parts no manifest lists).

Validation (each file, on the executor): the five datasets, dtypes, shapes, 10 s steps within
the file's date in the study's time zone, labels in {-1, 0 .. C-1}, flags in {0, 1}, finite data
(``h5format``); on the
driver: the ``<subject>/<YYYY-MM-DD>.h5`` layout, subject ids safe as a path component, and
consecutive dates per subject (the files after a gap are refused, the days before it kept). An
invalid file is reported as ``{"path", "field", "problem"}`` in the quarantine and the others
still convert; ``fail_fast=True`` raises :class:`~cerebro_tasks.deeppostures.h5format.H5FormatError`
at the first one and publishes nothing.

The study (recorded in the manifest, fixed for the dataset's life): its time zone (``timezone``,
an IANA name, default UTC: the zone of the machine that pre-processed it, see
:mod:`cerebro_tasks.deeppostures.clock`) and its label map (``label_map``, default sitting 0 /
not-sitting 1, see :mod:`cerebro_tasks.deeppostures.classes`). Omitted on a later run, they are
read back from the manifest; a different one is refused (convert into a new dataset). A zone that
does not fit the study, i.e. at least half the files read have windows outside their date in it
while another zone fits them, fails the whole run naming the zone, a few files and the zone that
fits, and publishes nothing. A daylight-saving change inside a file is handled as ``clock``
decides (an hour repeated: kept, listed in the report's ``dst_changes``; an hour skipped:
quarantined naming the windows).

Measured (``bench/convert.py``, 2 shared cores, 8 subjects x 4 full days, 276 k windows, 644 MB
of H5; medians of 5 runs interleaved with the ceiling): the conversion runs at ~155 k windows/s
(~360 MB/s of H5), 0.90 of a plain pyarrow write of the same in-memory arrays (0.76-1.24 per
run); a no-op re-run takes ~2 ms (0.1 % of a full run), one new subject ~0.4 s; peak memory per
task ~31 MB traced for a full day (Python worker RSS ~210 MB). Storage, row-group size and
compression: see :mod:`cerebro_tasks.deeppostures.petastorm_io`.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import resource
import shutil
import tempfile
import time
import tracemalloc
import uuid
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from cerebro_tasks.deeppostures import classes, clock, h5format
from cerebro_tasks.deeppostures import petastorm_io as pio
from cerebro_tasks.storage.store import Store

__all__ = ["convert", "dataset_study", "content_fingerprint", "ConversionError", "MANIFEST_FORMAT", "QUARANTINE_NAME", "list_h5_tree"]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "cerebro-windows/1"
QUARANTINE_NAME = "_cerebro_quarantine.json"
STAGING_DIR = "_staging"
_ERROR_TAG = "CEREBRO_H5_FORMAT_ERROR"
_DATE_FILE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.h5$")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ConversionError(RuntimeError):
    """The conversion job itself failed (not a bad input file: those are H5FormatError)."""


# ------------------------------------------------------------------------------------------------
# listing the H5 tree (driver)
# ------------------------------------------------------------------------------------------------


def list_h5_tree(h5_root: str) -> tuple[list[dict], list[dict]]:
    """Every ``<subject>/<YYYY-MM-DD>.h5`` under ``h5_root`` with its size and mtime, and the
    entries that do not fit the layout (as quarantine records). Local paths or any pyarrow URL.

    Files: ``{"rel", "path", "subject", "date", "size", "mtime_ns"}`` sorted by (subject, date).
    """
    store = Store(h5_root)
    root = store.path().rstrip("/")
    if store.fs.get_file_info(root).type != pafs.FileType.Directory:
        raise h5format.H5FormatError(h5_root, "path", "expected a directory of subject folders, found none")
    files: list[dict] = []
    rejected: list[dict] = _broken_links(store, root)
    subjects = store.fs.get_file_info(pafs.FileSelector(root))
    if not subjects and not rejected:
        raise h5format.H5FormatError(h5_root, "path", "expected subject folders of <YYYY-MM-DD>.h5 files, "
                                     "found an empty folder (a wrong path, or a disk not mounted?)")
    for sub in sorted(subjects, key=lambda i: i.path):
        name = posixpath.basename(sub.path)
        if name.startswith("."):
            continue
        if sub.type != pafs.FileType.Directory:
            rejected.append(_record(_display(store, sub.path), "path", "expected a subject folder, found a file"))
            continue
        try:
            h5format.validate_subject_id(name)
        except h5format.H5FormatError as err:
            rejected.append(_record(_display(store, sub.path), "subject", f"{err.problem} (subject folder name)"))
            continue
        rejected.extend(_broken_links(store, sub.path))
        for day in sorted(store.fs.get_file_info(pafs.FileSelector(sub.path)), key=lambda i: i.path):
            fname = posixpath.basename(day.path)
            if fname.startswith("."):
                continue
            match = _DATE_FILE_RE.match(fname)
            date = None
            if match and day.type == pafs.FileType.File:
                try:
                    date = _dt.date.fromisoformat(match[1])
                except ValueError:
                    date = None
            if date is None:
                rejected.append(_record(_display(store, day.path), "path",
                                        f"expected a file named <YYYY-MM-DD>.h5, found {fname!r}"))
                continue
            files.append({"rel": f"{name}/{fname}", "path": _display(store, day.path), "subject": name,
                          "date": date.isoformat(), "size": int(day.size), "mtime_ns": int(day.mtime_ns or 0)})
    files.sort(key=lambda f: (f["subject"], f["date"]))
    return files, rejected


def _broken_links(store: Store, folder: str) -> list[dict]:
    """Symbolic links in ``folder`` that lead nowhere, as quarantine records.

    pyarrow's listing leaves out a link whose target is missing or that loops, so without this a
    subject or a day would vanish from the dataset without a word. Only local folders have links.
    """
    if not store.is_local:
        return []
    out = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_symlink():
                continue
            try:
                os.stat(entry.path)
            except OSError as err:
                target = os.readlink(entry.path)
                what = "a symbolic link loop" if err.errno == errno.ELOOP else "a dangling symbolic link"
                out.append(_record(_display(store, entry.path), "path",
                                   f"expected a folder or an H5 file, found {what} (-> {target})"))
    return out


def _display(store: Store, path: str) -> str:
    """A path as the user gave the root: plain local path, or a URL on other filesystems."""
    if store.is_local:
        return path
    rel = posixpath.relpath(path, store.path().rstrip("/"))
    return store.url_of(*rel.split("/"))


def _record(path: str, field: str, problem: str) -> dict:
    return {"path": path, "field": field, "problem": problem}


def _gaps(files: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split the listing into files whose subject's days run on without a gap, and the files
    from each subject's first gap on (refused, naming the gap)."""
    kept: list[dict] = []
    refused: list[dict] = []
    by_subject: dict[str, list[dict]] = {}
    for f in files:
        by_subject.setdefault(f["subject"], []).append(f)
    for subject, days in by_subject.items():
        try:
            h5format.validate_consecutive_days([(_dt.date.fromisoformat(d["date"]), d["path"]) for d in days])
        except h5format.H5FormatError as err:
            gap = err
        else:
            kept.extend(days)
            continue
        first_bad = next(i for i, d in enumerate(days) if d["path"] == gap.path)
        kept.extend(days[:first_bad])
        for d in days[first_bad:]:
            problem = gap.problem if d["path"] == gap.path else \
                f"expected consecutive days, found it after a gap ({gap.problem})"
            refused.append(dict(_record(d["path"], "date", problem), rel=d["rel"], size=d["size"],
                                mtime_ns=d["mtime_ns"]))
    return kept, refused


# ------------------------------------------------------------------------------------------------
# executor side: one H5 file -> one Parquet part
# ------------------------------------------------------------------------------------------------


def _part_name(subject: str, date: str, fingerprint: str) -> str:
    """File name of a part: sorts by subject then date, names its content, safe in any URL."""
    safe = subject if _SAFE_NAME_RE.match(subject) else "x" + subject.encode("utf-8").hex()
    return f"part-{safe}-{date}-{fingerprint.split(':', 1)[-1][:16]}.parquet"


def _localise(path: str, tmpdir: str) -> str:
    """A local path h5py can open: the file itself, or a copy in ``tmpdir`` for other filesystems
    (streamed in 4 MB chunks; disk: one file)."""
    if "://" not in path:
        return path
    if path.startswith("file://"):
        return path[len("file://"):]
    fs, fs_path = pafs.FileSystem.from_uri(path)
    local = os.path.join(tmpdir, posixpath.basename(fs_path))
    with fs.open_input_stream(fs_path) as src, open(local, "wb") as dst:
        for chunk in iter(lambda: src.read(4 << 20), b""):
            dst.write(chunk)
    return local


def content_fingerprint(table) -> str:
    """SHA-256 of a file's converted windows (every column's Arrow buffers): its content.

    Hashing what the dataset stores, rather than the H5 file's bytes, reads each file once
    instead of twice (the second read was a third of a task's time in bench/convert.py), hashes
    11.5 MB per full day instead of 21 MB, and re-converts a changed file only when the dataset
    would change (HDF5 chunking, attributes or float64 digits below float32 precision do not).
    """
    h = hashlib.sha256()
    h.update(pio.MANIFEST_NAME.encode())  # namespace: a different encoding -> a different hash
    for name in table.column_names:
        h.update(f";{name}:{table.schema.field(name).type};".encode())
        for chunk in table.column(name).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return "sha256:" + h.hexdigest()


def _dst_changes(day: h5format.H5Day, zone: str) -> list[dict]:
    """The daylight-saving changes a (valid) file spans: the window after each, and the change."""
    out = []
    for at, change in clock.offset_changes(int(day.time[0]), int(day.time[-1]) + 1, zone):
        window = int(np.searchsorted(day.time, at + max(0, -change)))  # mktime's step (see clock)
        out.append({"window": window, "change_s": int(change),
                    "at": _dt.datetime.fromtimestamp(at, clock.zone_info(zone)).isoformat()})
    return out


def _convert_group(group: list[dict]) -> list[dict]:
    """Executor: the files of one Spark task, one after the other (memory: one file at a time)."""
    return [_convert_one(task) for task in group]


def _invalid(task: dict, out: dict, field: str, problem: str) -> dict:
    if task.get("fail_fast"):  # abort the Spark job; the driver turns this back into H5FormatError
        raise RuntimeError(_ERROR_TAG + json.dumps({"path": task["path"], "field": field, "problem": problem})
                           + _ERROR_TAG)
    out.update(status="invalid", field=field, problem=problem)
    return out


def _convert_one(task: dict) -> dict:
    """Executor: read, validate, fingerprint and convert one H5 file into a staged Parquet part.

    Returns a small record (never the data): ``status`` "converted", "unchanged" (the file was
    re-read because its size or mtime changed, but its content is the same) or "invalid" (with
    field and problem). With ``fail_fast`` an invalid file raises, which aborts the Spark job.
    """
    started = time.perf_counter()
    if task.get("measure_memory"):
        tracemalloc.start()
    tmpdir = tempfile.mkdtemp(prefix="cerebro-h5-")
    out: dict[str, Any] = {"rel": task["rel"], "path": task["path"], "subject": task["subject"],
                           "date": task["date"], "size": task["size"], "mtime_ns": task["mtime_ns"]}
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = time.perf_counter() - started - sum(phases.values())

    try:
        local = _localise(task["path"], tmpdir)
        try:
            day = h5format.read_h5(local, task["subject"], task["date"], validate=True,
                                   timezone=task["timezone"], num_classes=task["num_classes"])
        except h5format.OutsideDateError as err:  # counted by the driver: the zone may be wrong
            out["time_range"] = [err.first, err.last]
            return _invalid(task, out, err.field, err.problem)
        except h5format.H5FormatError as err:
            return _invalid(task, out, err.field, err.problem)
        except OSError as err:  # not an HDF5 file at all, truncated, unreadable
            return _invalid(task, out, "file", f"expected a readable HDF5 file, found: {err}")
        lap("read_validate")
        n = day.num_windows
        out["dst_changes"] = _dst_changes(day, task["timezone"])
        usable = int(np.count_nonzero((day.non_wear == 0) & (day.sleeping == 0) & (day.label != -1)))
        table = pio.windows_to_table({
            "id": day.subject, "time": day.time.astype(np.int64), "data": day.data,
            "non_wear": day.non_wear, "sleeping": day.sleeping, "label": day.label,
        })
        del day
        lap("encode")
        fingerprint = content_fingerprint(table)
        out["fingerprint"] = fingerprint
        lap("fingerprint")
        if task.get("known_fingerprint") == fingerprint and task.get("known_part"):
            out.update(status="unchanged")
            return out
        part = _part_name(task["subject"], task["date"], fingerprint)
        stage = Store(task["stage_url"])
        stage.fs.create_dir(stage.path(), recursive=True)
        written = pio.write_windows_file(stage.fs, stage.path(part), table,
                                         row_group_rows=task["row_group_rows"])
        lap("write")
        out.update(status="converted", part=part, windows=n, usable=usable,
                   row_groups=written["row_groups"], bytes=written["bytes"])
        return out
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        out["phases"] = {k: round(v, 4) for k, v in phases.items()}
        if task.get("measure_memory"):
            out["peak_traced_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
            tracemalloc.stop()
        # ru_maxrss (KiB on Linux) is the Python worker's peak over its life: a bound per task.
        out["worker_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out["task_seconds"] = round(time.perf_counter() - started, 4)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------

# Files go to Spark in groups, not one task per file: a PySpark task costs ~0.1-0.2 s of fixed
# overhead on a small machine, more than converting a whole day file (~0.05-0.1 s). At least one
# group per core, up to 3 per core for load balance, but no fewer than _MIN_FILES_PER_TASK files
# per group when there are few files (groups are packed by file size, largest first).
_TASKS_PER_CORE = 3
_MIN_FILES_PER_TASK = 16


def _num_groups(num_files: int, cores: int) -> int:
    return max(1, min(num_files, max(cores, min(cores * _TASKS_PER_CORE, -(-num_files // _MIN_FILES_PER_TASK)))))


def _group_tasks(tasks: list[dict], groups: int) -> list[list[dict]]:
    """Files into at most ``groups`` groups of about equal total size (greedy largest first)."""
    n = max(1, min(len(tasks), int(groups)))
    out: list[list[dict]] = [[] for _ in range(n)]
    loads = [0] * n
    for task in sorted(tasks, key=lambda t: (-int(t["size"]), t["rel"])):
        i = min(range(n), key=lambda k: (loads[k], k))
        out[i].append(task)
        loads[i] += int(task["size"])
    return [g for g in out if g]


def _empty_manifest(h5_root: str, row_group_rows: int) -> dict:
    return {"format": MANIFEST_FORMAT, "version": 0, "h5_root": h5_root, "row_group_rows": row_group_rows,
            "files": {}, "quarantine": {}}


def dataset_study(dataset_url: str) -> dict[str, Any]:
    """The study a dataset was converted for: ``{"timezone", "label_map"}`` from its manifest
    (UTC and the default map for datasets written before they were recorded, or without one)."""
    store = Store(dataset_url)
    manifest = store.read_json(pio.MANIFEST_NAME) if store.exists(pio.MANIFEST_NAME) else {}
    return {"timezone": manifest.get("timezone", clock.DEFAULT_ZONE),
            "label_map": manifest.get("label_map", dict(classes.DEFAULT_LABEL_MAP))}


def _study(manifest: dict, store: Store, timezone: str | None, label_map: dict | str | None) -> tuple[str, dict]:
    """The run's zone and label map: as given, else as recorded; a change on a dataset that
    already holds files is refused (its windows were checked, and are read, in the recorded ones)."""
    recorded_zone = manifest.get("timezone", clock.DEFAULT_ZONE)
    recorded_map = manifest.get("label_map", dict(classes.DEFAULT_LABEL_MAP))
    zone = recorded_zone if timezone is None else clock.check_zone(timezone)
    label_map = recorded_map if label_map is None else classes.check_label_map(label_map)
    if manifest.get("files"):
        for what, given, recorded in (("time zone", zone, recorded_zone), ("label map", label_map, recorded_map)):
            if given != recorded:
                raise ConversionError(f"{store.url}: this dataset was converted with the {what} {recorded!r}, "
                                      f"asked for {given!r}; convert into a new dataset to change it")
    return zone, label_map


def _check_zone_fits(zone: str, results: list[dict], skipped: int) -> None:
    """Fail the run when ``zone`` does not fit the study: at least half the files have windows
    outside their date in it and another zone fits those files (a few bad files are quarantined)."""
    misfits = [r for r in results if r.get("time_range")]
    if not misfits or 2 * len(misfits) < len(results) + skipped:
        return
    sample = misfits[:200]
    fits = clock.zones_that_fit((_dt.date.fromisoformat(r["date"]), *r["time_range"]) for r in sample)
    if not fits or zone in fits:
        return
    examples = "; ".join(f"{r['path']}: {r['problem']}" for r in misfits[:3])
    also = f" (or another zone with the same offsets on these dates, e.g. {', '.join(fits[1:4])})" if fits[1:] else ""
    raise ConversionError(
        f"time zone {zone!r} does not fit this study: {len(misfits)} of {len(results) + skipped} files have windows "
        f"outside their date in {zone}, e.g. {examples}. The zone that fits: {fits[0]}{also}; pass the zone of the "
        f"machine that pre-processed the study (--timezone {fits[0]}). Nothing was published.")


def _load_manifest(store: Store, h5_root: str, row_group_rows: int) -> dict:
    if not store.exists(pio.MANIFEST_NAME):
        return _empty_manifest(h5_root, row_group_rows)
    manifest = store.read_json(pio.MANIFEST_NAME)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConversionError(f"{store.url_of(pio.MANIFEST_NAME)}: expected format {MANIFEST_FORMAT!r}, "
                              f"found {manifest.get('format')!r}")
    return manifest


def _raise_tagged(err: BaseException) -> None:
    """Turn a fail-fast error raised on an executor back into an H5FormatError on the driver."""
    text = str(err)
    match = re.search(re.escape(_ERROR_TAG) + r"(\{.*?\})" + re.escape(_ERROR_TAG), text, re.S)
    if match:
        info = json.loads(match.group(1))
        raise h5format.H5FormatError(info["path"], info["field"], info["problem"]) from None


LOCK_NAME = "_cerebro_convert.lock"
# the holder refreshes the lock this often; one silent for three beats (a killed task on another
# host) is taken over, as the run lock is
LOCK_HEARTBEAT_S = 30.0
# A part the new manifest no longer lists (its file changed or went) stays this long after the
# commit, recorded in the manifest's "superseded": a reader that read the old manifest just before
# the commit (a split or predict job, minutes to hours) can still open every file it lists. A
# later conversion deletes it.
SUPERSEDED_GRACE_S = 24 * 3600.0


def convert(h5_root: str, dataset_url: str, *, spark=None, fail_fast: bool = False, verify: bool = False,
            row_group_rows: int = pio.DEFAULT_ROW_GROUP_ROWS, measure_memory: bool = False,
            lock_wait_s: float = 3600.0, timezone: str | None = None,
            label_map: dict[str, int] | str | None = None, superseded_grace_s: float = SUPERSEDED_GRACE_S) -> dict:
    """Convert (incrementally) every H5 day file under ``h5_root`` into the dataset at ``dataset_url``.

    Returns a report: ``files`` counts (listed, converted, skipped, unchanged_content, removed,
    quarantined), ``windows`` (live total and converted this run), ``subjects``, ``quarantine``
    (``[{"path", "field", "problem"}]``), ``version`` (the manifest's commit number, bumped only
    when the dataset changed), ``bytes_read``/``bytes_written``, ``peak_task_memory_mb``,
    ``timezone``, ``label_map``, ``dst_changes`` and ``seconds``. See the module docstring for the
    semantics (``timezone`` and ``label_map``: None = as recorded, else UTC and the default map).

    One conversion at a time per dataset (the ingest and model-selection DAGs both convert, both
    at midnight): a second one waits up to ``lock_wait_s`` for the first, then fails with
    :class:`~cerebro_tasks.storage.store.LockedError` naming the holder.
    """
    store = Store(dataset_url)
    _refuse_foreign_folder(store)
    with store.lock(LOCK_NAME, wait_s=lock_wait_s, heartbeat_s=LOCK_HEARTBEAT_S):
        return _convert_locked(h5_root, store, spark=spark, fail_fast=fail_fast, verify=verify,
                               row_group_rows=row_group_rows, measure_memory=measure_memory,
                               timezone=timezone, label_map=label_map, superseded_grace_s=superseded_grace_s)


def _convert_locked(h5_root: str, store: Store, *, spark, fail_fast: bool, verify: bool, row_group_rows: int,
                    measure_memory: bool, timezone: str | None, label_map: dict | str | None,
                    superseded_grace_s: float = SUPERSEDED_GRACE_S) -> dict:
    started = time.perf_counter()
    dataset_url = store.url
    if spark is None:
        from cerebro_tasks.spark_session import get_spark

        spark = get_spark("cerebro-convert")
    manifest = _load_manifest(store, h5_root, int(row_group_rows))
    zone, label_map = _study(manifest, store, timezone, label_map)
    old_files: dict[str, dict] = manifest["files"]
    old_quarantine: dict[str, dict] = manifest.get("quarantine", {})

    listed, rejected = list_h5_tree(h5_root)
    kept, gap_refused = _gaps(listed)
    listing_problems = rejected + [{k: r[k] for k in ("path", "field", "problem")} for r in gap_refused]
    if fail_fast and listing_problems:
        first = sorted(listing_problems, key=lambda r: r["path"])[0]
        raise h5format.H5FormatError(first["path"], first["field"], first["problem"])

    # Decide per file: skip (same size and mtime), re-read (content may be unchanged), or convert.
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    stage_url = store.url_of(STAGING_DIR, run_id) if not store.is_local else store.path(STAGING_DIR, run_id)
    tasks: list[dict] = []
    skipped: dict[str, dict] = {}
    carried_quarantine: dict[str, dict] = {}
    for f in kept:
        old = old_files.get(f["rel"])
        same_stat = old is not None and old["size"] == f["size"] and old["mtime_ns"] == f["mtime_ns"]
        if same_stat and not verify:
            skipped[f["rel"]] = old
            continue
        oldq = old_quarantine.get(f["rel"])
        if oldq is not None and oldq.get("size") == f["size"] and oldq.get("mtime_ns") == f["mtime_ns"] \
                and oldq.get("field") != "date" and not verify and not fail_fast:
            carried_quarantine[f["rel"]] = oldq  # same bad file as last time: no need to read it again
            continue
        tasks.append(dict(f, stage_url=stage_url, row_group_rows=int(row_group_rows), fail_fast=fail_fast,
                          measure_memory=measure_memory, timezone=zone, num_classes=len(label_map),
                          known_fingerprint=old["fingerprint"] if old else None,
                          known_part=old["part"] if old else None))

    timings = {"plan": round(time.perf_counter() - started, 3)}
    results: list[dict] = []
    job_started = time.perf_counter()
    if tasks:
        sc = spark.sparkContext
        groups = _group_tasks(tasks, _num_groups(len(tasks), sc.defaultParallelism))
        try:
            results = sc.parallelize(groups, len(groups)).flatMap(_convert_group).collect()
        except Exception as err:  # noqa: BLE001 - Py4J wraps executor exceptions
            _cleanup_stage(store, run_id)
            _raise_tagged(err)
            raise ConversionError(f"conversion job failed for {h5_root} -> {dataset_url}: "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    try:
        _check_zone_fits(zone, results, len(skipped))
    except ConversionError:
        _cleanup_stage(store, run_id)
        raise

    timings["job"] = round(time.perf_counter() - job_started, 3)
    publish_started = time.perf_counter()

    # New manifest state.
    new_files: dict[str, dict] = {}
    quarantine: dict[str, dict] = {}
    converted: list[dict] = []
    unchanged_content = 0
    for rel, entry in skipped.items():
        new_files[rel] = entry
    for r in results:
        if r["status"] == "converted":
            entry = {k: r[k] for k in ("subject", "date", "size", "mtime_ns", "fingerprint", "part", "windows",
                                       "usable", "row_groups", "bytes")}
            new_files[r["rel"]] = entry
            converted.append(r)
        elif r["status"] == "unchanged":
            entry = dict(old_files[r["rel"]], size=r["size"], mtime_ns=r["mtime_ns"])
            new_files[r["rel"]] = entry
            unchanged_content += 1
        else:
            quarantine[r["rel"]] = {"path": r["path"], "field": r["field"], "problem": r["problem"],
                                    "size": r["size"], "mtime_ns": r["mtime_ns"]}
    quarantine.update(carried_quarantine)
    for r in gap_refused:
        quarantine[r["rel"]] = {"path": r["path"], "field": r["field"], "problem": r["problem"],
                                "size": r["size"], "mtime_ns": r["mtime_ns"]}
    removed = sorted(rel for rel in old_files if rel not in new_files)
    obsolete_parts = {old_files[rel]["part"] for rel in old_files
                      if rel not in new_files or new_files[rel]["part"] != old_files[rel]["part"]}
    live_parts = {e["part"] for e in new_files.values()}
    obsolete_parts -= live_parts

    changed = bool(converted or removed or obsolete_parts)
    # superseded parts wait out the grace period (part name -> when it was superseded, epoch s)
    now = time.time()
    old_superseded: dict[str, float] = manifest.get("superseded", {})
    superseded = {p: t for p, t in old_superseded.items() if p not in live_parts}
    superseded.update({p: now for p in obsolete_parts if p not in superseded})
    expired = sorted(p for p, t in superseded.items() if now - float(t) >= superseded_grace_s)
    superseded = {p: t for p, t in sorted(superseded.items()) if p not in expired}
    manifest_dirty = changed or unchanged_content or quarantine != old_quarantine \
        or superseded != old_superseded or not store.exists(pio.MANIFEST_NAME)
    manifest_dirty = manifest_dirty or manifest.get("timezone") != zone or manifest.get("label_map") != label_map
    new_manifest = dict(manifest, files=dict(sorted(new_files.items())), quarantine=dict(sorted(quarantine.items())),
                        h5_root=h5_root, row_group_rows=int(row_group_rows), timezone=zone, label_map=label_map,
                        superseded=superseded)
    if changed:
        new_manifest["version"] = int(manifest.get("version", 0)) + 1
        new_manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    # Publish: parts in place, then the manifest (the commit), then clean up and Petastorm metadata.
    stage_store = Store(stage_url)
    for r in converted:
        store.fs.move(stage_store.path(r["part"]), store.path(r["part"]))
    if manifest_dirty:
        store.write_json(new_manifest, pio.MANIFEST_NAME)
    for part in expired:
        _delete_file(store, part)
    _cleanup_stage(store, None)
    orphans = _remove_orphans(store, live_parts | set(superseded))
    if changed or orphans or not _petastorm_metadata_current(store, new_files):
        pio.write_petastorm_metadata(store.url_of() if not store.is_local else store.path(),
                                     {e["part"]: e["row_groups"] for e in new_files.values()})
    quarantine_list = [{k: q[k] for k in ("path", "field", "problem")}
                       for _, q in sorted(quarantine.items())] + rejected
    quarantine_list.sort(key=lambda q: q["path"])
    _write_quarantine(store, quarantine_list)

    timings["publish"] = round(time.perf_counter() - publish_started, 3)
    bytes_read = sum(int(t["size"]) for t in tasks)
    report = {
        "h5_root": h5_root,
        "dataset_url": dataset_url,
        "version": int(new_manifest["version"]),
        "files": {
            "listed": len(listed) + len(rejected),
            "converted": len(converted),
            "skipped": len(skipped),
            "unchanged_content": unchanged_content,
            "removed": len(removed),
            "quarantined": len(quarantine_list),
        },
        "windows": {"total": sum(int(e["windows"]) for e in new_files.values()),
                    "converted": sum(int(r["windows"]) for r in converted)},
        "subjects": len({e["subject"] for e in new_files.values()}),
        "new_subjects": sorted({r["subject"] for r in converted} - {e["subject"] for e in old_files.values()}),
        "removed": removed,
        "quarantine": quarantine_list,
        "timezone": zone,
        "label_map": label_map,
        "dst_changes": [{"path": r["path"], **c} for r in converted for c in r.get("dst_changes", [])],
        "bytes_read": bytes_read,
        "bytes_written": sum(int(r["bytes"]) for r in converted),
        "peak_task_memory_mb": {
            "traced_max": max((r.get("peak_traced_mb", 0.0) for r in results), default=None)
            if measure_memory else None,
            "worker_maxrss_max": max((r.get("worker_maxrss_mb", 0.0) for r in results), default=None),
        },
        "task_seconds_total": round(sum(r.get("task_seconds", 0.0) for r in results), 3),
        "timings": timings,
        "task_phase_seconds": {k: round(sum(r.get("phases", {}).get(k, 0.0) for r in results), 3)
                               for k in ("read_validate", "fingerprint", "encode", "write")},
        "seconds": round(time.perf_counter() - started, 3),
    }
    for q in quarantine_list:
        log.warning("quarantined %s: field '%s': %s", q["path"], q["field"], q["problem"])
    for c in report["dst_changes"]:
        log.warning("%s: daylight-saving change of %+d s at %s (%s) before window %d: kept in file order, "
                    "timestamps as time.mktime made them", c["path"], c["change_s"], c["at"], zone, c["window"])
    log.info("convert %s -> %s: %s", h5_root, dataset_url, report["files"])
    return report


_PART_RE = re.compile(r"^part-.+-\d{4}-\d{2}-\d{2}-[0-9a-f]{16}\.parquet$")


def _refuse_foreign_folder(store: Store) -> None:
    """Refuse a dataset URL that holds something other than a dataset made by :func:`convert`.

    Cleaning up (orphan parts, staging) deletes files, so it must never run in someone else's
    folder, e.g. a dataset written by the published example.
    """
    if store.exists(pio.MANIFEST_NAME):
        return
    info = store.fs.get_file_info(store.path())
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise ConversionError(f"{store.url}: expected a folder for the dataset, found a file")
    foreign = sorted(posixpath.basename(i.path) for i in store.fs.get_file_info(pafs.FileSelector(store.path()))
                     if not posixpath.basename(i.path).startswith(("_", ".")) and
                     not _PART_RE.match(posixpath.basename(i.path)))
    if foreign:
        raise ConversionError(f"{store.url}: expected an empty folder or a dataset made by convert "
                              f"(with {pio.MANIFEST_NAME}), found other entries: {foreign[:5]}")


def _petastorm_metadata_current(store: Store, files: dict[str, dict]) -> bool:
    """``_common_metadata`` exists and lists exactly the live parts (cheap: one small file)."""
    try:
        _, row_groups, _ = pio.read_petastorm_metadata(store.path() if store.is_local else store.url_of())
    except (OSError, ValueError):
        return False
    return row_groups == {e["part"]: e["row_groups"] for e in files.values()}


def _write_quarantine(store: Store, records: list[dict]) -> None:
    current = None
    if store.exists(QUARANTINE_NAME):
        try:
            current = store.read_json(QUARANTINE_NAME)
        except (OSError, ValueError):
            current = None
    if current != records:
        store.write_json(records, QUARANTINE_NAME)


def _delete_file(store: Store, name: str) -> None:
    try:
        store.fs.delete_file(store.path(name))
    except FileNotFoundError:
        pass


def _cleanup_stage(store: Store, run_id: str | None) -> None:
    """Remove one run's staging folder, or (None) the whole staging area after a commit."""
    path = store.path(STAGING_DIR, run_id) if run_id else store.path(STAGING_DIR)
    try:
        if store.fs.get_file_info(path).type == pafs.FileType.Directory:
            store.fs.delete_dir(path)
    except OSError as err:
        log.warning("could not remove staging folder %s: %s", path, err)


def _remove_orphans(store: Store, live_parts: set[str]) -> int:
    """Delete visible parts no manifest lists (left by a run that crashed before its commit)."""
    removed = 0
    selector = pafs.FileSelector(store.path(), allow_not_found=True)
    for info in store.fs.get_file_info(selector):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and name.startswith("part-") and name.endswith(".parquet") \
                and name not in live_parts:
            _delete_file(store, name)
            removed += 1
    return removed
