"""The DeepPostures (CHAP) pre-processed H5 format: listing, reading and validation.

One file per subject and calendar day, ``<root>/<subject>/<YYYY-MM-DD>.h5``, holding five datasets
(see ``shared/reference/deeppostures.md``):

========== ============= ======= ===========================================================
dataset    shape         dtype   meaning
========== ============= ======= ===========================================================
time       (N,)          float64 window start, epoch seconds, consecutive windows 10 s apart
data       (N, 100, 3)   float64 100 samples at 10 Hz of X, Y, Z acceleration in g
non_wear   (N,)          int64   1 = device not worn
sleeping   (N,)          int64   1 = subject asleep
label      (N,)          int64   class index (default 0 sitting, 1 not-sitting), -1 no label
========== ============= ======= ===========================================================

Validation policy (what :func:`read_h5` checks when ``validate=True``):

* the five datasets must exist and be datasets (not groups); extra datasets, groups and
  attributes are ignored, so a study that stores more than the reference still reads;
* dtype *kind* is strict (time/data floating point, flags/label integer, signed or unsigned) but
  the *width* is lenient: float32 or int32 files are accepted and widened to float64 / int64, so an
  ``H5Day`` always carries the exact reference dtypes;
* shapes: ``time`` (N,), ``data`` (N, 100, 3), the flags and ``label`` (N,), same N, N >= 1;
* ``time`` finite, every window start inside the file's calendar date read in the study's time
  zone (``timezone``, default UTC: pre-processing converts the device's wall clock with
  ``time.mktime`` in its machine's zone, see :mod:`cerebro_tasks.deeppostures.clock`), and
  consecutive windows exactly 10 s apart, except the one step a daylight-saving change makes
  (an hour repeated: kept; an hour skipped: refused, naming the windows; see ``clock``);
* ``label`` in {-1, 0, ..., C-1} (``num_classes`` C, default 2), ``non_wear`` and ``sleeping``
  in {0, 1}, ``data`` finite.

The label of sleep and non-wear windows is not checked against the flags: the reference
pre-processing takes labels from activPAL events regardless of sleep logs and non-wear times, so
real files may carry 0/1 labels on excluded windows. Consumers must exclude by the flags.

Every problem is reported as :class:`H5FormatError` naming the file, the field, what was expected
and what was found. Reading holds one file in memory at a time (about 21 MB for a full day).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from typing import Iterable

from zoneinfo import ZoneInfo

import h5py
import numpy as np

from cerebro_tasks.deeppostures import clock

__all__ = [
    "DATASETS",
    "WINDOW_SECONDS",
    "SAMPLES_PER_WINDOW",
    "WINDOWS_PER_DAY",
    "LABEL_VALUES",
    "label_values",
    "FLAG_VALUES",
    "H5Day",
    "H5FormatError",
    "OutsideDateError",
    "list_h5_files",
    "scan_h5_root",
    "validate_subject_id",
    "read_h5",
    "validate_day",
    "validate_consecutive_days",
]

# name -> (dtype, trailing shape after the window axis), in the order the reference writes them.
DATASETS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "time": (np.dtype("float64"), ()),
    "data": (np.dtype("float64"), (100, 3)),
    "non_wear": (np.dtype("int64"), ()),
    "sleeping": (np.dtype("int64"), ()),
    "label": (np.dtype("int64"), ()),
}
WINDOW_SECONDS = 10
SAMPLES_PER_WINDOW = 100
WINDOWS_PER_DAY = 86_400 // WINDOW_SECONDS  # 8640
# what a day file may declare: the longest local day (25 h, when daylight saving time ends)
MAX_WINDOWS_PER_FILE = 25 * 3600 // WINDOW_SECONDS  # 9000
LABEL_VALUES = (-1, 0, 1)
FLAG_VALUES = (0, 1)

MAX_SUBJECT_ID_LENGTH = 128
_DATE_FILE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})\.h5$")


class H5FormatError(ValueError):
    """A DeepPostures file or folder that does not follow the format.

    ``path`` is the offending file (or folder, or ``""`` when there is none), ``field`` the dataset
    or part at fault (``"label"``, ``"path"``, ``"subject"``, ``"date"``, ...) and ``problem`` says
    what was expected and what was found.
    """

    def __init__(self, path: str, field: str, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        prefix = f"{self.path}: " if self.path else ""
        super().__init__(f"{prefix}field '{field}': {problem}")

    def __reduce__(self):  # keep the three attributes when pickled (Spark ships exceptions)
        return (type(self), (self.path, self.field, self.problem))


class OutsideDateError(H5FormatError):
    """Windows outside the file's date in the study's zone: the sign of a wrong zone when most
    files of a study show it. ``first`` and ``last`` are the file's first and last window start."""

    def __init__(self, path: str, field: str, problem: str, first: float = 0.0, last: float = 0.0) -> None:
        super().__init__(path, field, problem)
        self.first = float(first)
        self.last = float(last)

    def __reduce__(self):
        return (type(self), (self.path, self.field, self.problem, self.first, self.last))


@dataclass
class H5Day:
    """One subject-day file in memory, always with the reference dtypes (float64 / int64)."""

    subject: str
    date: _dt.date
    path: str
    time: np.ndarray
    data: np.ndarray
    non_wear: np.ndarray
    sleeping: np.ndarray
    label: np.ndarray

    @property
    def num_windows(self) -> int:
        """Number of 10 s windows (N)."""
        return int(self.time.shape[0])


# --------------------------------------------------------------------------------------------
# Names: subjects, dates, folders
# --------------------------------------------------------------------------------------------


def validate_subject_id(subject: str, *, path: str = "") -> None:
    """Check that ``subject`` is safe as one path component and as an id in every store we write.

    Rules: a non-empty ``str`` of at most 128 printable characters, without ``/``, ``\\``, ``.``
    (the reference splits file names on the first dot) or NUL, not starting with ``-`` (would read
    as an option on a command line) and without leading or trailing whitespace.
    Raises :class:`H5FormatError` with ``field="subject"``; ``path`` only decorates the message.
    """
    problem = _subject_id_problem(subject)
    if problem is not None:
        raise H5FormatError(path, "subject", f"{problem}, found {subject!r}")


def _subject_id_problem(subject: object) -> str | None:
    """The first rule ``subject`` breaks, phrased as an expectation, or None when it is safe."""
    if not isinstance(subject, str):
        return "expected a str subject id"
    if not subject:
        return "expected a non-empty subject id"
    if len(subject) > MAX_SUBJECT_ID_LENGTH:
        return f"expected at most {MAX_SUBJECT_ID_LENGTH} characters"
    for bad in ("/", "\\", ".", "\x00"):
        if bad in subject:
            return f"expected no {bad!r} in the subject id"
    if subject.startswith("-"):
        return "expected a subject id not starting with '-'"
    if not subject.isprintable():
        return "expected only printable characters"
    if subject != subject.strip():
        return "expected no leading or trailing whitespace"
    return None


def _parse_day_file_name(name: str) -> _dt.date | None:
    """``'2024-03-04.h5'`` -> date, or None when the name is not exactly ``YYYY-MM-DD.h5``."""
    match = _DATE_FILE_RE.match(name)
    if match is None:
        return None
    try:
        return _dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:  # 2024-02-30.h5
        return None


def scan_h5_root(root: str) -> tuple[list[tuple[str, _dt.date, str]], list[tuple[str, str]]]:
    """Walk ``<root>/<subject>/<YYYY-MM-DD>.h5`` and sort what is there.

    Returns ``(files, rejected)``: ``files`` is ``(subject, date, path)`` sorted by subject then
    date; ``rejected`` is ``(path, reason)`` for every entry that does not fit the layout (a file
    at the top level, a nested folder, a badly named file, an unsafe subject folder), sorted by
    path. Names starting with ``.`` are skipped at both levels, as the reference reader does (and
    as :mod:`cerebro_tasks.deeppostures.synth` names its temporary files). Local paths only.
    """
    if not os.path.isdir(root):
        raise H5FormatError(root, "path", "expected a directory of subject folders, found none")
    files: list[tuple[str, _dt.date, str]] = []
    rejected: list[tuple[str, str]] = []
    for subject in sorted(os.listdir(root)):
        if subject.startswith("."):
            continue
        subject_dir = os.path.join(root, subject)
        if not os.path.isdir(subject_dir):
            rejected.append((subject_dir, "expected a subject folder, found a file"))
            continue
        problem = _subject_id_problem(subject)
        if problem is not None:
            rejected.append((subject_dir, f"{problem} (subject folder name)"))
            continue
        for name in sorted(os.listdir(subject_dir)):
            if name.startswith("."):
                continue
            path = os.path.join(subject_dir, name)
            day = _parse_day_file_name(name)
            if day is None or not os.path.isfile(path):
                rejected.append((path, "expected a file named <YYYY-MM-DD>.h5"))
                continue
            files.append((subject, day, path))
    files.sort(key=lambda item: (item[0], item[1]))
    rejected.sort()
    return files, rejected


def list_h5_files(root: str) -> list[tuple[str, _dt.date, str]]:
    """``(subject, date, path)`` for every ``<root>/<subject>/<YYYY-MM-DD>.h5``, sorted.

    Strict: anything else under ``root`` (except hidden names) raises :class:`H5FormatError`
    with ``field="path"`` naming the first such entry, because a stray file in a study folder
    usually means a mis-copied study. Use :func:`scan_h5_root` to get the strays back instead.
    Days are not checked for gaps here; see :func:`validate_consecutive_days`.
    """
    files, rejected = scan_h5_root(root)
    if rejected:
        path, reason = rejected[0]
        more = f" ({len(rejected) - 1} more unexpected entries)" if len(rejected) > 1 else ""
        raise H5FormatError(path, "path", f"{reason}, found {os.path.basename(path)!r}{more}")
    return files


def validate_consecutive_days(days: list[tuple[_dt.date, str]]) -> None:
    """Check that one subject's days, in the order given, follow each other with no gap.

    ``days`` is ``[(date, path), ...]`` (e.g. from :func:`list_h5_files`, already sorted).
    Raises :class:`H5FormatError` (``field="date"``) naming the path after the gap, for example
    ``expected 2024-03-05 after 2024-03-04, found 2024-03-07``. Duplicates and disorder fail too.
    """
    for (prev_date, _), (date, path) in zip(days, days[1:]):
        expected = prev_date + _dt.timedelta(days=1)
        if date != expected:
            raise H5FormatError(
                path, "date", f"expected {expected.isoformat()} after {prev_date.isoformat()}, "
                f"found {date.isoformat()}")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_h5(path: str, subject: str | None = None, date: _dt.date | str | None = None, *,
            validate: bool = True, timezone: str = clock.DEFAULT_ZONE, num_classes: int = 2) -> H5Day:
    """Read one DeepPostures day file into an :class:`H5Day`.

    ``subject`` defaults to the name of the file's folder and ``date`` to the file name
    (``YYYY-MM-DD.h5``); ``date`` may be a ``date``, a ``datetime`` or an ISO string.
    With ``validate`` (the default) every rule in the module docstring is checked (dates in the
    study's ``timezone``, labels below ``num_classes``) and the first broken one raises
    :class:`H5FormatError`; without it only presence is checked and values are
    converted to the reference dtypes as they are (for trusted data, e.g. just written).
    A file that is not HDF5 at all, or cannot be read, raises h5py's ``OSError`` unchanged: an
    I/O failure is not a verdict on the data.
    """
    path = os.fspath(path)
    if subject is None:
        subject = os.path.basename(os.path.dirname(os.path.abspath(path)))
    day = _resolve_date(path, date)
    if validate:
        validate_subject_id(subject, path=path)
    with h5py.File(path, "r") as h5:
        datasets = _require_datasets(path, h5)
        if validate:
            _check_metadata(path, datasets)
        # Widen to the reference dtypes; a no-op copy-free read when they already match.
        arrays = {name: np.asarray(datasets[name][()], dtype=DATASETS[name][0])
                  for name in DATASETS}
    result = H5Day(subject=subject, date=day, path=path, **arrays)
    if validate:
        validate_day(result, timezone=timezone, num_classes=num_classes)
    return result


def _resolve_date(path: str, date: _dt.date | str | None) -> _dt.date:
    """The file's calendar date: given explicitly, or parsed from ``YYYY-MM-DD.h5``."""
    if isinstance(date, _dt.datetime):
        return date.date()
    if isinstance(date, _dt.date):
        return date
    if isinstance(date, str):
        try:
            return _dt.date.fromisoformat(date)
        except ValueError:
            raise H5FormatError(path, "date", f"expected an ISO date YYYY-MM-DD, found {date!r}")
    parsed = _parse_day_file_name(os.path.basename(path))
    if parsed is None:
        raise H5FormatError(path, "path", "expected a file named <YYYY-MM-DD>.h5 (or an explicit "
                            f"date), found {os.path.basename(path)!r}")
    return parsed


def _require_datasets(path: str, h5: h5py.File) -> dict[str, h5py.Dataset]:
    """The five datasets, or an error naming every missing one and what the file has instead."""
    missing = [name for name in DATASETS if name not in h5]
    if missing:
        wanted = ", ".join(repr(name) for name in missing)
        noun = "a dataset named" if len(missing) == 1 else "datasets named"
        present = ", ".join(sorted(h5.keys())) or "nothing"
        raise H5FormatError(path, ", ".join(missing),
                            f"expected {noun} {wanted}, found none (file has: {present})")
    for name in DATASETS:
        if not isinstance(h5[name], h5py.Dataset):
            raise H5FormatError(path, name, f"expected a dataset, found {type(h5[name]).__name__}")
    return {name: h5[name] for name in DATASETS}


def _check_metadata(path: str, datasets: dict[str, h5py.Dataset]) -> None:
    """dtype kinds and shapes of all five datasets, before reading any values."""
    for name, (dtype, _) in DATASETS.items():
        found = datasets[name].dtype
        if dtype.kind == "f" and found.kind != "f":
            raise H5FormatError(path, name,
                                f"expected a floating-point dtype ({dtype}), found {found}")
        if dtype.kind == "i" and found.kind not in "iu":
            raise H5FormatError(path, name, f"expected an integer dtype ({dtype}), found {found}")
    for name, (_, trailing) in DATASETS.items():
        shape = datasets[name].shape
        if shape is None or len(shape) != 1 + len(trailing) or tuple(shape[1:]) != trailing:
            raise H5FormatError(path, name, f"expected shape {_shape_text(trailing)}, "
                                f"found {shape}")
    n = datasets["time"].shape[0]
    if n > MAX_WINDOWS_PER_FILE:  # checked before reading: such a file would not fit in memory
        raise H5FormatError(path, "time", f"expected at most {MAX_WINDOWS_PER_FILE} windows (a 25-hour day of "
                            f"{WINDOW_SECONDS} s windows), found datasets of {n}")
    for name in DATASETS:
        if datasets[name].shape[0] != n:
            raise H5FormatError(path, name, f"expected {n} windows (the length of 'time'), "
                                f"found {datasets[name].shape[0]}")
    if n < 1:
        raise H5FormatError(path, "time", "expected at least 1 window, found 0")


def _shape_text(trailing: tuple[int, ...]) -> str:
    """``(100, 3)`` -> ``'(N, 100, 3)'``; ``()`` -> ``'(N,)'``."""
    return "(" + ", ".join(["N"] + [str(d) for d in trailing]) + ("," if not trailing else "") + ")"


def validate_day(day: H5Day, *, timezone: str = clock.DEFAULT_ZONE, num_classes: int = 2) -> None:
    """Check the values of a day already in memory (shapes are assumed right).

    Also usable on arrays built in memory before writing. Raises :class:`H5FormatError`.
    """
    _check_time(day.path, day.time, day.date, timezone)
    _check_values(day.path, "label", day.label, label_values(num_classes))
    _check_values(day.path, "non_wear", day.non_wear, FLAG_VALUES)
    _check_values(day.path, "sleeping", day.sleeping, FLAG_VALUES)
    _check_finite_data(day.path, day.data)


def label_values(num_classes: int = 2) -> tuple[int, ...]:
    """The labels a file of a ``num_classes``-class study may hold: -1 (no label), 0 .. C-1."""
    if int(num_classes) < 2:
        raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    return (-1, *range(int(num_classes)))


def _check_time(path: str, time: np.ndarray, day: _dt.date, zone: str = clock.DEFAULT_ZONE) -> None:
    """Finite, every window start inside ``day`` in ``zone``, exactly 10 s steps except the one
    a daylight-saving change makes (:mod:`cerebro_tasks.deeppostures.clock` decides which)."""
    bad = _first_index(~np.isfinite(time))
    if bad is not None:
        raise H5FormatError(path, "time",
                            f"expected finite epoch seconds, found {time[bad]} at window {bad}")
    start, end = clock.day_bounds(day, zone)
    bad = _first_index((time < start) | (time >= end))
    if bad is not None:
        raise OutsideDateError(
            path, "time", f"expected window starts within {day.isoformat()} ({zone}), "
            f"found {_wall_text(time[bad], zone)} at window {bad}", time[0], time[-1])
    steps = np.diff(time)
    odd = steps != WINDOW_SECONDS
    for change_at, change in clock.offset_changes(start, end, zone):
        # mktime's step: the first window after it starts within 10 s of the change (clocks
        # forward) or of the end of the repeated hour, which mktime read with the earlier offset.
        after = change_at + max(0, -change)
        at = np.flatnonzero(odd & (time[1:] >= after) & (time[1:] < after + WINDOW_SECONDS))
        if at.size != 1 or steps[at[0]] != WINDOW_SECONDS - change:
            continue
        i = int(at[0])
        if change > 0:  # an hour skipped: its windows carry the epoch seconds of the next hour's
            n = change // WINDOW_SECONDS
            first = max(i + 1 - n, 0)
            offset = clock.utc_offset(change_at - 1, zone)  # before the change: how mktime read the hour
            wall = [_wall_text(t + offset, "UTC") for t in (time[first], time[i], change_at)]
            raise H5FormatError(
                path, "time", f"expected window starts in time order, found windows {first}-{i} (device wall "
                f"clock {wall[0]} to {wall[1]}, in the hour {zone} skips at {wall[2]}) at the epoch "
                f"seconds of windows {i + 1}-{min(i + n, len(time) - 1)}, as time.mktime gives them; "
                f"quarantined rather than interleaved with them")
        odd[i] = False  # an hour repeated: mktime read it once; windows stay in order
    bad = _first_index(odd)
    if bad is not None:
        raise H5FormatError(
            path, "time", f"expected consecutive windows exactly {WINDOW_SECONDS} s apart, "
            f"found {steps[bad]:g} s between window {bad} and window {bad + 1}")


def _check_values(path: str, field: str, values: np.ndarray, allowed: Iterable[int]) -> None:
    """Every value of an integer field in ``allowed``; name the first one that is not."""
    allowed = tuple(allowed)
    bad = _first_index(~np.isin(values, allowed))
    if bad is not None:
        allowed_text = "{" + ", ".join(str(v) for v in allowed) + "}"
        raise H5FormatError(path, field, f"expected values in {allowed_text}, "
                            f"found {values[bad]} at window {bad}")


def _check_finite_data(path: str, data: np.ndarray) -> None:
    """No NaN or infinity in the acceleration samples; name window, sample and axis."""
    finite = np.isfinite(data)
    if finite.all():
        return
    window, sample, axis = np.argwhere(~finite)[0]
    raise H5FormatError(path, "data", f"expected finite values, found {data[window, sample, axis]} "
                        f"at window {window} (sample {sample}, axis {axis})")


def _first_index(mask: np.ndarray) -> int | None:
    """Index of the first True in a 1-D mask, or None."""
    if not mask.any():
        return None
    return int(np.argmax(mask))


def _wall_text(epoch_seconds: float, zone: str) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS`` wall clock in ``zone`` (for messages)."""
    try:
        moment = _dt.datetime.fromtimestamp(float(epoch_seconds), tz=ZoneInfo(zone))
    except (OverflowError, OSError, ValueError):
        return f"{epoch_seconds!r} s"
    return moment.strftime("%Y-%m-%d %H:%M:%S")
