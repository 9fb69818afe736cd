"""Synthetic DeepPostures data: realistic, learnable, byte-for-byte reproducible H5 day files.

``synthesize(out, subjects=..., days=..., seed=...)`` writes ``<out>/<subject>/<YYYY-MM-DD>.h5``
in exactly the reference format (:mod:`cerebro_tasks.deeppostures.h5format`): five datasets, no groups,
no attributes, uncompressed, chunked, float64/int64, one file per consecutive calendar day.

What a subject looks like
-------------------------
A *behaviour timeline* at sample resolution (0.1 s) alternates sitting bouts (log-uniform
5-60 min) with not-sitting bouts (1-15 min, steered so that about 74-86 % of the time, a
per-subject target, is sitting), each not-sitting bout being standing (10 s - 3 min) and walking
(10 s - 5 min) sub-bouts. Bout edges fall anywhere, so windows at transitions are mixed and
their label is the mode of their samples, as in the reference pre-processing. On top of it:

* nightly sleep (``sleeping=1``), about 23:00-07:00 with per-subject and per-night jitter, lying
  on the back, a side or the front, turning over every 20-120 min;
* non-wear (``non_wear=1``): 15-50 min after most wake-ups (shower, dressing) and on some days a
  30-120 min stretch during the day; the device lies still on a table (no body signal);
* unlabelled stretches (``label=-1``) while worn and awake: the first and last 10-40 min of the
  recording (activPAL not yet on / already off) and on most days a 10-60 min gap.

Signals are in g, device frame X (medio-lateral), Y (vertical), Z (antero-posterior), upright
gravity reading +1 g on Y (a convention of this generator). Posture sets the direction of gravity
(upright when standing or walking, hip tilted back 15-40 deg per subject plus per-bout jitter when
sitting, horizontal when lying); movement sets the dynamics (walking at the subject's 1.6-2.2 Hz
cadence with a second harmonic and a stride component, small low-frequency sway when standing,
sparse fidgets when sitting, a ~2 s push at every sit-to-stand and stand-to-sit). Every worn
sample is turned by a per-subject device rotation (up to 25 deg about a random axis) and gets
per-subject white sensor noise. The rotation blurs sitting and standing still across subjects:
a per-window logistic regression on axis means and deviations reaches about 0.95 balanced
accuracy on unseen subjects (nearest centroid about 0.8), leaving room for models that use
context.

By default sleep and non-wear windows carry ``label=-1``. The reference pre-processing actually
takes labels from activPAL regardless of sleep and non-wear, so ``label_excluded=True`` writes
what it would (0 while lying asleep, the underlying behaviour while the hip device is off) to let
consumers prove they exclude by the flags, not by the label.

Clock and files
---------------
The timeline is wall clock, windows aligned to whole 10 s from midnight. ``time`` is what
DeepPostures' pre-processing writes on a machine in ``timezone`` (default UTC): the wall clock
through ``time.mktime`` in that zone (:func:`cerebro_tasks.deeppostures.clock.wall_to_epoch`),
so a study "pre-processed" in ``America/Los_Angeles`` or ``Australia/Sydney`` has the same
windows, flags and labels as the UTC one, with times shifted by the zone's offset (and, on a
daylight-saving day, mktime's step at the change).

Classes: ``num_classes=2`` (default) labels sitting 0 and standing or walking 1, DeepPostures'
default map; ``num_classes=3`` labels sitting 0, standing 1, walking (stepping) 2.

Full days (the default): the recording starts at 13:00-16:00 on the first day (09:00-10:00 when ``days=1``) and ends at
11:00-13:00 on the last (17:00-18:00 when ``days=1``); middle days hold 8,640 windows.

``windows_per_day=K`` (compact, for fast tests): every file holds K windows; day 1 holds the K
windows before midnight and every later day the K windows from midnight, so day 1 and day 2
are continuous across midnight and later days are separated by a clock gap. Sleep, non-wear and
unlabelled stretches are then placed at fixed fractions of each file (sleep about 30-55 %,
non-wear about 70-85 %, unlabelled about 8-25 % of the way through, all away from the file edges)
instead of by clock time, so the midnight between day 1 and 2 is awake, worn and labelled.
Bouts keep their real lengths, so K >= 360 (one hour) gives a useful mix; below about 30 windows
a stretch may round to nothing.

Reproducibility
---------------
Every random stream is ``numpy.random.default_rng(SeedSequence([seed, subject_index, stream]))``
so adding subjects never changes earlier subjects, and a day's noise does not depend on the
other days. Datasets are written with fixed chunk shapes and ``track_times=False`` (HDF5 stores
modification times otherwise): same arguments give the same bytes. Each file is written to a
hidden temporary name in its folder and moved into place with ``os.replace``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Sequence

import h5py
import numpy as np

from cerebro_tasks.deeppostures import clock
from cerebro_tasks.deeppostures.h5format import (
    DATASETS,
    SAMPLES_PER_WINDOW,
    WINDOW_SECONDS,
    WINDOWS_PER_DAY,
    validate_subject_id,
)

__all__ = ["synthesize", "subject_id", "write_day_h5", "add_cli_arguments", "run_cli", "main"]

SAMPLE_HZ = SAMPLES_PER_WINDOW // WINDOW_SECONDS  # 10 Hz
_MINUTE = 60 * SAMPLE_HZ  # samples per minute
_DAY_SECONDS = 86_400

# Per-sample states. The first three are behaviours (the activPAL truth); the last two are
# overlays that replace the body signal.
SIT, STAND, WALK, LIE, TABLE = 0, 1, 2, 3, 4

# Fixed chunk shapes (windows per chunk): reproducible bytes, ~150 kB chunks for data.
CHUNK_WINDOWS = {"time": 2048, "data": 64, "non_wear": 2048, "sleeping": 2048, "label": 2048}

_SMOOTH_SAMPLES = 15  # posture transitions take about 1.5 s
_SWAY_SAMPLES = 25  # sway is band-limited to below about 0.4 Hz
_MARGIN = 32  # extra samples rendered on each side so filters see real neighbours

# Posture geometry (degrees). These set how hard sitting is to tell from standing still: the
# per-subject device rotation blurs the tilt between subjects, so a per-window classifier is
# good but not perfect and context (bouts, transitions, walking nearby) is worth learning.
_MAX_ROTATION_DEG = 25.0
_SIT_TILT_DEG = (15.0, 40.0)
_SIT_JITTER_DEG = 8.0
_STAND_JITTER_DEG = 5.0

# Per-state dynamics: sway amplitude (g, before the per-subject factor), fidget rate per sample
# and fidget amplitude (g).
_SWAY_G = np.array([0.004, 1.0, 0.02, 0.002, 0.0])  # STAND uses the subject's sway_g
_FIDGET_RATE = np.array([0.003, 0.004, 0.0, 0.0002, 0.0])
_FIDGET_G = np.array([0.08, 0.06, 0.0, 0.05, 0.0])

# Lying poses in the body frame (back, left side, right side, front) and how often they occur.
_LYING_POSES = np.array([[0.0, 0.1, 0.99], [0.98, 0.1, 0.15], [-0.98, 0.1, 0.15],
                         [0.0, 0.1, -0.99]])
_LYING_WEIGHTS = np.array([0.4, 0.25, 0.25, 0.1])
# A device on a table: face up, face down, on its side (device frame, no body rotation).
_TABLE_POSES = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])

# Random stream ids under (seed, subject_index).
_STREAM_PROFILE, _STREAM_PLAN, _STREAM_BOUTS, _STREAM_DAY = 0, 1, 2, 3


@dataclass(frozen=True)
class _Profile:
    """What makes one synthetic subject different from another."""

    rotation: np.ndarray  # (3, 3) device rotation on the body
    sit_tilt_deg: float  # backward hip tilt when seated
    sit_roll_deg: float  # habitual sideways lean when seated
    cadence_hz: float  # steps per second
    walk_g: float  # vertical step amplitude
    sway_g: float  # standing sway amplitude
    noise_g: float  # white sensor noise
    sit_fraction: float  # target share of sitting in the behaviour timeline
    bed_offset_s: float  # habitual shift of bed time from 23:00
    wake_offset_s: float  # habitual shift of wake time from 07:00


@dataclass
class _Bouts:
    """The behaviour timeline: bout ``i`` covers samples ``[starts[i], starts[i+1])``."""

    starts: np.ndarray  # int64
    kinds: np.ndarray  # int8: SIT, STAND, WALK
    gravity: np.ndarray  # (B, 3) unit vectors, body frame
    cadence: np.ndarray  # Hz, walking bouts only
    phase: np.ndarray  # radians
    amp: np.ndarray  # g


@dataclass
class _Overlays:
    """Sleep, non-wear and unlabelled stretches as ``[start, end)`` sample intervals."""

    sleep: list[tuple[int, int, np.ndarray]]  # with the lying pose of that stretch
    non_wear: list[tuple[int, int, np.ndarray]]  # with the table pose
    unlabelled: list[tuple[int, int]]


@dataclass(frozen=True)
class _DayPlan:
    """One output file: its date, its first window on the subject's timeline, its clock."""

    date: _dt.date
    first_window: int
    num_windows: int
    time0: float  # epoch seconds of the first window


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def subject_id(prefix: str, index: int) -> str:
    """Id of the ``index``-th (0-based) subject: ``S0001``, ``S0002``, ... (fixed width 4)."""
    return f"{prefix}{index + 1:04d}"


def synthesize(out_dir: str, *, subjects: int, days: int, seed: int,
               windows_per_day: int | None = None, start_date: str = "2024-03-04",
               subject_prefix: str = "S", label_excluded: bool = False, timezone: str = clock.DEFAULT_ZONE,
               num_classes: int = 2) -> list[str]:
    """Write ``subjects`` x ``days`` DeepPostures day files under ``out_dir``; return their paths.

    Paths are sorted by subject then date. Files of an earlier run with the same arguments are
    overwritten (same bytes); any other ``*.h5`` already in a subject folder makes this raise
    ``FileExistsError`` before anything is written, so a stale day can never join a new
    recording. See the module docstring for what the data looks like.
    """
    first_date = _check_arguments(subjects, days, seed, windows_per_day, start_date,
                                  subject_prefix)
    clock.check_zone(timezone)
    if num_classes not in (2, 3):
        raise ValueError(f"num_classes: expected 2 (sitting / not-sitting) or 3 (sitting / standing / "
                         f"stepping), found {num_classes!r}")
    ids = [subject_id(subject_prefix, i) for i in range(subjects)]
    for sid in ids:
        validate_subject_id(sid)
    dates = [first_date + _dt.timedelta(days=d) for d in range(days)]
    _refuse_stale_files(out_dir, ids, dates)
    written: list[str] = []
    for index, sid in enumerate(ids):
        folder = os.path.join(out_dir, sid)
        os.makedirs(folder, exist_ok=True)
        for date, arrays in _subject_days(seed, index, first_date, days, windows_per_day,
                                          label_excluded, num_classes):
            arrays["time"] = clock.wall_to_epoch(arrays["time"], timezone)  # as mktime in that zone
            path = os.path.join(folder, f"{date.isoformat()}.h5")
            write_day_h5(path, arrays)
            written.append(path)
    return written


def write_day_h5(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write one day file in the reference layout, atomically and reproducibly.

    ``arrays`` maps each name of :data:`DATASETS` to its values (cast to the exact dtype).
    Datasets are chunked with fixed shapes and resizable along the window axis, like the
    reference pre-processing writes them, without compression, attributes or timestamps.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")  # hidden: listings skip it
    try:
        with h5py.File(tmp, "w") as h5:
            for field, (dtype, trailing) in DATASETS.items():
                values = np.ascontiguousarray(arrays[field], dtype=dtype)
                h5.create_dataset(field, data=values, chunks=(CHUNK_WINDOWS[field], *trailing),
                                  maxshape=(None, *trailing), track_times=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Command line (the lead's cli.py calls add_cli_arguments + run_cli)
# --------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``synth`` options: ``--out --subjects --days --seed [--windows-per-day K]``."""
    parser.add_argument("--out", required=True, help="output root: <out>/<subject>/<date>.h5")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--days", type=int, required=True, help="calendar days per subject")
    parser.add_argument("--seed", type=int, required=True, help="random seed (>= 0)")
    parser.add_argument("--windows-per-day", type=int, default=None, metavar="K",
                        help="compact mode: K windows per day file (fast tests)")
    parser.add_argument("--start-date", default="2024-03-04", help="first day, YYYY-MM-DD")
    parser.add_argument("--subject-prefix", default="S", help="subject ids are <prefix>0001...")
    parser.add_argument("--label-excluded", action="store_true",
                        help="label sleep/non-wear windows as activPAL would instead of -1")
    parser.add_argument("--timezone", default=clock.DEFAULT_ZONE,
                        help="write times as DeepPostures' pre-processing does on a machine in this zone (IANA name)")
    parser.add_argument("--num-classes", type=int, default=2, choices=(2, 3),
                        help="2: sitting / not-sitting; 3: sitting / standing / stepping")
    return parser


def run_cli(args: argparse.Namespace) -> list[str]:
    """Run ``synthesize`` from parsed ``add_cli_arguments`` options."""
    return synthesize(args.out, subjects=args.subjects, days=args.days, seed=args.seed,
                      windows_per_day=args.windows_per_day, start_date=args.start_date,
                      subject_prefix=args.subject_prefix, label_excluded=args.label_excluded,
                      timezone=args.timezone, num_classes=args.num_classes)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cerebro_tasks.deeppostures.synth --out DIR ...``: write the files, print a summary."""
    parser = add_cli_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    paths = run_cli(args)
    print(f"wrote {len(paths)} files under {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# Arguments and files
# --------------------------------------------------------------------------------------------


def _check_arguments(subjects: int, days: int, seed: int, windows_per_day: int | None,
                     start_date: str, subject_prefix: str) -> _dt.date:
    """Reject impossible requests early, with the argument's name; return the first date."""
    if not isinstance(subjects, int) or subjects < 0:
        raise ValueError(f"subjects: expected an integer >= 0, found {subjects!r}")
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"days: expected an integer >= 1, found {days!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, found {seed!r}")
    if windows_per_day is not None and not (
            isinstance(windows_per_day, int) and 1 <= windows_per_day <= WINDOWS_PER_DAY):
        raise ValueError(f"windows_per_day: expected None or an integer in 1..{WINDOWS_PER_DAY}, "
                         f"found {windows_per_day!r}")
    if not isinstance(subject_prefix, str):
        raise ValueError(f"subject_prefix: expected a str, found {subject_prefix!r}")
    try:
        return _dt.date.fromisoformat(start_date)
    except (TypeError, ValueError):
        raise ValueError(f"start_date: expected YYYY-MM-DD, found {start_date!r}") from None


def _refuse_stale_files(out_dir: str, ids: list[str], dates: list[_dt.date]) -> None:
    """Raise before writing if a subject folder holds a day file this run would not write."""
    expected = {f"{d.isoformat()}.h5" for d in dates}
    for sid in ids:
        folder = os.path.join(out_dir, sid)
        if not os.path.isdir(folder):
            continue
        stale = sorted(n for n in os.listdir(folder)
                       if n.endswith(".h5") and not n.startswith(".") and n not in expected)
        if stale:
            raise FileExistsError(f"{folder}: holds {', '.join(stale)}, which this run would not "
                                  "write; remove the folder or choose another --out")


# --------------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------------


def _rng(seed: int, subject_index: int, *stream: int) -> np.random.Generator:
    """An independent stream per (seed, subject, purpose[, day])."""
    return np.random.default_rng(np.random.SeedSequence([seed, subject_index, *stream]))


def _subject_days(seed: int, index: int, first_date: _dt.date, days: int,
                  windows_per_day: int | None, label_excluded: bool, num_classes: int = 2):
    """Yield ``(date, arrays)`` for each day file of subject ``index``, one day in memory."""
    profile = _make_profile(_rng(seed, index, _STREAM_PROFILE))
    plan_rng = _rng(seed, index, _STREAM_PLAN)
    if windows_per_day is None:
        plans = _full_day_plans(plan_rng, first_date, days)
        overlays = _clock_overlays(plan_rng, profile, plans)
    else:
        plans = _compact_day_plans(first_date, days, windows_per_day)
        overlays = _compact_overlays(plan_rng, plans)
    total = (plans[-1].first_window + plans[-1].num_windows) * SAMPLES_PER_WINDOW
    bouts = _make_bouts(_rng(seed, index, _STREAM_BOUTS), profile, total)
    for d, plan in enumerate(plans):
        arrays = _render_day(_rng(seed, index, _STREAM_DAY, d), profile, bouts, overlays, plan,
                             label_excluded, num_classes)
        yield plan.date, arrays


def _make_profile(rng: np.random.Generator) -> _Profile:
    """Draw one subject's body, device placement, gait and habits."""
    axis = rng.normal(size=3)
    angle = np.deg2rad(rng.uniform(0.0, _MAX_ROTATION_DEG))
    rotation = _rotation_matrix(axis / np.linalg.norm(axis), angle)
    return _Profile(
        rotation=rotation,
        sit_tilt_deg=rng.uniform(*_SIT_TILT_DEG),
        sit_roll_deg=rng.normal(0.0, 5.0),
        cadence_hz=rng.uniform(1.6, 2.2),
        walk_g=rng.uniform(0.25, 0.5),
        sway_g=rng.uniform(0.01, 0.03),
        noise_g=rng.uniform(0.004, 0.015),
        sit_fraction=rng.uniform(0.74, 0.86),
        bed_offset_s=float(np.clip(rng.normal(0.0, 2400.0), -5400.0, 5400.0)),
        wake_offset_s=float(np.clip(rng.normal(0.0, 2400.0), -5400.0, 5400.0)),
    )


def _rotation_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula: rotation by ``angle`` radians about the unit vector ``axis``."""
    x, y, z = axis
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _gravity(pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Body-frame gravity for a trunk pitched back by ``pitch`` and leaning by ``roll``."""
    p, r = np.deg2rad(pitch_deg), np.deg2rad(roll_deg)
    return np.array([np.sin(r) * np.cos(p), np.cos(r) * np.cos(p), np.sin(p)])


# --------------------------------------------------------------------------------------------
# Day plans and overlays
# --------------------------------------------------------------------------------------------


def _midnight_epoch(date: _dt.date) -> float:
    """Epoch seconds of 00:00 UTC on ``date``."""
    return _dt.datetime(date.year, date.month, date.day, tzinfo=_dt.timezone.utc).timestamp()


def _minute_of_day(rng: np.random.Generator, low_h: float, high_h: float) -> int:
    """A whole minute between two hours of the day, as seconds after midnight."""
    return 60 * int(rng.integers(int(low_h * 60), int(high_h * 60)))


def _full_day_plans(rng: np.random.Generator, first_date: _dt.date, days: int) -> list[_DayPlan]:
    """Real clock: partial first and last day, full days in between."""
    if days == 1:
        start_s, end_s = _minute_of_day(rng, 9, 10), _minute_of_day(rng, 17, 18)
    else:
        start_s, end_s = _minute_of_day(rng, 13, 16), _minute_of_day(rng, 11, 13)
    plans, first = [], 0
    for d in range(days):
        date = first_date + _dt.timedelta(days=d)
        begin = start_s if d == 0 else 0
        end = end_s if d == days - 1 else _DAY_SECONDS
        n = (end - begin) // WINDOW_SECONDS
        plans.append(_DayPlan(date, first, n, _midnight_epoch(date) + begin))
        first += n
    return plans


def _compact_day_plans(first_date: _dt.date, days: int, k: int) -> list[_DayPlan]:
    """K windows per file: day 1 ends at midnight, later days start at midnight."""
    plans = []
    for d in range(days):
        date = first_date + _dt.timedelta(days=d)
        begin = _DAY_SECONDS - k * WINDOW_SECONDS if d == 0 else 0
        plans.append(_DayPlan(date, d * k, k, _midnight_epoch(date) + begin))
    return plans


def _sample_at(plans: list[_DayPlan], day: int, seconds: float) -> int:
    """Timeline sample of ``seconds`` after midnight of day ``day`` (may fall outside)."""
    start = plans[0].time0
    return int(round((_midnight_epoch(plans[0].date) + day * _DAY_SECONDS + seconds - start)
                     * SAMPLE_HZ))


def _split_sleep(rng: np.random.Generator, start: int, end: int
                 ) -> list[tuple[int, int, np.ndarray]]:
    """Cut one night into stretches of 20-120 min, each in a lying pose different from the last."""
    parts, pose, t = [], -1, start
    while t < end:
        length = int(rng.uniform(20, 120) * _MINUTE)
        choices = [i for i in range(len(_LYING_POSES)) if i != pose]
        weights = _LYING_WEIGHTS[choices] / _LYING_WEIGHTS[choices].sum()
        pose = int(rng.choice(choices, p=weights))
        vector = _LYING_POSES[pose] / np.linalg.norm(_LYING_POSES[pose])
        parts.append((t, min(end, t + length), vector))
        t += length
    return parts


def _table_pose(rng: np.random.Generator) -> np.ndarray:
    """A device lying on a table: one of a few resting faces, tilted by up to 3 degrees."""
    base = _TABLE_POSES[int(rng.integers(len(_TABLE_POSES)))]
    tilted = base + rng.normal(0.0, np.deg2rad(1.5), size=3)
    return tilted / np.linalg.norm(tilted)


def _clock_overlays(rng: np.random.Generator, profile: _Profile, plans: list[_DayPlan]
                    ) -> _Overlays:
    """Sleep, non-wear and unlabelled stretches by time of day (full-day mode)."""
    total = (plans[-1].first_window + plans[-1].num_windows) * SAMPLES_PER_WINDOW
    sleep, non_wear, unlabelled = [], [], []
    for night in range(len(plans) - 1):
        bed = 23 * 3600 + profile.bed_offset_s + rng.normal(0.0, 1200.0)
        wake = 31 * 3600 + profile.wake_offset_s + rng.normal(0.0, 1200.0)
        bed_s, wake_s = 60 * round(bed / 60), 60 * round(wake / 60)  # sleep logs are in minutes
        sleep += _split_sleep(rng, _sample_at(plans, night, bed_s),
                              _sample_at(plans, night, wake_s))
        if rng.random() < 0.85:  # shower and dressing after getting up
            off = _sample_at(plans, night, wake_s)
            non_wear.append((off, off + int(rng.integers(15, 51)) * _MINUTE, _table_pose(rng)))
    for day in range(len(plans)):
        if rng.random() < 0.4:
            start = _sample_at(plans, day, _minute_of_day(rng, 10, 19))
            non_wear.append((start, start + int(rng.integers(30, 121)) * _MINUTE,
                             _table_pose(rng)))
        if rng.random() < 0.6:
            start = _sample_at(plans, day, _minute_of_day(rng, 9, 21))
            unlabelled.append((start, start + int(rng.integers(10, 61)) * _MINUTE))
    unlabelled.append((0, int(rng.integers(10, 41)) * _MINUTE))
    unlabelled.append((total - int(rng.integers(10, 41)) * _MINUTE, total))
    return _Overlays(sleep, non_wear, unlabelled)


def _compact_overlays(rng: np.random.Generator, plans: list[_DayPlan]) -> _Overlays:
    """One sleep, non-wear and unlabelled stretch per file, at fixed fractions of the file."""
    sleep, non_wear, unlabelled = [], [], []

    def stretch(base: int, k: int, at: float, length: float) -> tuple[int, int]:
        """Whole windows from about ``at`` of the file, ``length`` of it long (at least one)."""
        first = base + int(round((at + rng.uniform(-0.03, 0.03)) * k))
        last = first + max(1, int(round(length * k)))
        return first * SAMPLES_PER_WINDOW, last * SAMPLES_PER_WINDOW

    for plan in plans:
        base, k = plan.first_window, plan.num_windows
        start, end = stretch(base, k, 0.32, rng.uniform(0.15, 0.22))
        sleep += _split_sleep(rng, start, end)
        start, end = stretch(base, k, 0.74, rng.uniform(0.04, 0.08))
        non_wear.append((start, end, _table_pose(rng)))
        unlabelled.append(stretch(base, k, 0.12, rng.uniform(0.05, 0.1)))
    return _Overlays(sleep, non_wear, unlabelled)


# --------------------------------------------------------------------------------------------
# Behaviour timeline
# --------------------------------------------------------------------------------------------


def _make_bouts(rng: np.random.Generator, profile: _Profile, total: int) -> _Bouts:
    """Alternate sitting and not-sitting bouts until ``total`` samples are covered.

    Sitting bouts are log-uniform 5-60 min. Each not-sitting bout (1-15 min) is what brings the
    running share of sitting back to the subject's target, times a log-normal jitter, so even a
    short recording lands near the target while bout lengths still vary. Bouts are drawn in
    order, so a longer recording only adds bouts.
    """
    rows: list[tuple[int, int, np.ndarray, float, float, float]] = []
    sat = stood = 0
    t = 0
    sitting = rng.random() < profile.sit_fraction
    while t < total:
        if sitting:
            length = int(np.exp(rng.uniform(np.log(5), np.log(60))) * _MINUTE)
            pitch = profile.sit_tilt_deg + rng.normal(0.0, _SIT_JITTER_DEG)
            roll = profile.sit_roll_deg + rng.normal(0.0, 5.0)
            rows.append((t, SIT, _gravity(pitch, roll), 0.0, 0.0, 0.0))
            sat += length
        else:
            owed = sat * (1.0 - profile.sit_fraction) / profile.sit_fraction - stood
            length = int(np.clip(owed * rng.lognormal(0.0, 0.4), 1 * _MINUTE, 15 * _MINUTE))
            rows += _not_sitting_rows(rng, profile, t, length)
            stood += length
        t += length
        sitting = not sitting
    starts, kinds, gravity, cadence, phase, amp = zip(*rows)
    return _Bouts(np.array(starts, dtype=np.int64), np.array(kinds, dtype=np.int8),
                  np.array(gravity), np.array(cadence), np.array(phase), np.array(amp))


def _not_sitting_rows(rng: np.random.Generator, profile: _Profile, start: int, length: int
                      ) -> list[tuple[int, int, np.ndarray, float, float, float]]:
    """Standing (10 s - 3 min) and walking (10 s - 5 min, log-uniform) sub-bouts."""
    rows, t, end = [], start, start + length
    walking = rng.random() < 0.5
    while t < end:
        if walking:
            sub = int(np.exp(rng.uniform(np.log(10), np.log(300))) * SAMPLE_HZ)
            cadence = float(np.clip(profile.cadence_hz + rng.normal(0.0, 0.05), 1.5, 2.3))
            rows.append((t, WALK, _gravity(rng.normal(5.0, 2.0), rng.normal(0.0, 2.0)), cadence,
                         rng.uniform(0.0, 2 * np.pi), profile.walk_g * rng.uniform(0.85, 1.15)))
        else:
            sub = int(rng.uniform(10, 180) * SAMPLE_HZ)
            rows.append((t, STAND, _gravity(rng.normal(0.0, _STAND_JITTER_DEG),
                                              rng.normal(0.0, _STAND_JITTER_DEG)),
                         0.0, 0.0, 0.0))
        t += sub
        walking = not walking
    return rows


# --------------------------------------------------------------------------------------------
# Rendering one day
# --------------------------------------------------------------------------------------------


def _render_day(rng: np.random.Generator, profile: _Profile, bouts: _Bouts, overlays: _Overlays,
                plan: _DayPlan, label_excluded: bool, num_classes: int = 2) -> dict[str, np.ndarray]:
    """Materialise one day file's five arrays from the subject's timeline (vectorised)."""
    first = plan.first_window * SAMPLES_PER_WINDOW
    n = plan.num_windows * SAMPLES_PER_WINDOW
    idx = np.arange(first - _MARGIN, first + n + _MARGIN)  # margins feed the filters
    bout = np.maximum(np.searchsorted(bouts.starts, idx, side="right") - 1, 0)
    behaviour = bouts.kinds[bout]
    state = behaviour.copy()
    body_g = bouts.gravity[bout]
    table_g = np.zeros_like(body_g)
    unlabelled = np.zeros(idx.shape, dtype=bool)
    for start, end, pose in overlays.sleep:
        sl = _clip(start, end, idx[0], idx.size)
        state[sl], body_g[sl] = LIE, pose
    for start, end, pose in overlays.non_wear:  # the device is off: wins over sleep
        sl = _clip(start, end, idx[0], idx.size)
        state[sl], table_g[sl] = TABLE, pose
    for start, end in overlays.unlabelled:
        unlabelled[_clip(start, end, idx[0], idx.size)] = True

    worn = state != TABLE
    gravity = np.where(worn[:, None], body_g @ profile.rotation.T, table_g)
    # Posture changes take ~1.5 s: a moving average turns gravity steps into ramps.
    signal = _moving_sum(gravity, _SMOOTH_SAMPLES) / _SMOOTH_SAMPLES
    # Dynamics are zero on the table (see the per-state tables), so no mask is needed.
    signal += _body_dynamics(rng, profile, bouts, bout, idx, state) @ profile.rotation.T
    signal += rng.normal(size=signal.shape) * np.where(worn, profile.noise_g, 0.002)[:, None]
    keep = slice(_MARGIN, _MARGIN + n)

    # SIT, STAND, WALK are 0, 1, 2: three classes as they are, two as sitting / not-sitting
    labels = (behaviour if num_classes == 3 else np.where(behaviour == SIT, 0, 1)).astype(np.int64)
    if label_excluded:
        labels[state == LIE] = 0  # activPAL logs lying as sedentary
    else:
        labels[(state == LIE) | (state == TABLE)] = -1
    labels[unlabelled] = -1
    return {
        "time": plan.time0 + WINDOW_SECONDS * np.arange(plan.num_windows, dtype=np.float64),
        "data": signal[keep].reshape(plan.num_windows, SAMPLES_PER_WINDOW, 3),
        "non_wear": _window_mode(state[keep] == TABLE, (0, 1)),
        "sleeping": _window_mode(state[keep] == LIE, (0, 1)),
        "label": _window_mode(labels[keep], tuple(range(-1, num_classes))),
    }


def _clip(start: int, end: int, offset: int, size: int) -> slice:
    """The part of timeline interval ``[start, end)`` inside ``[offset, offset + size)``."""
    return slice(min(max(start - offset, 0), size), min(max(end - offset, 0), size))


def _body_dynamics(rng: np.random.Generator, profile: _Profile, bouts: _Bouts, bout: np.ndarray,
                   idx: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Movement on top of gravity, body frame (X lateral, Y vertical, Z forward), in g."""
    n = idx.size
    sway_g = _SWAY_G[state] * np.where(state == STAND, profile.sway_g, 1.0)
    sway = _moving_sum(rng.normal(size=(n, 3)), _SWAY_SAMPLES) / np.sqrt(_SWAY_SAMPLES)
    dyn = sway * sway_g[:, None]

    # Fidgets: sparse impulses shaped into ~1 s bumps.
    hits = np.flatnonzero(rng.random(n) < _FIDGET_RATE[state])
    impulses = np.zeros((n, 3))
    impulses[hits] = rng.normal(size=(hits.size, 3)) * _FIDGET_G[state[hits]][:, None]
    dyn += _convolve_columns(impulses, np.hanning(11)[1:-1])

    # Sit-to-stand and stand-to-sit: a ~2 s push, forward and up, at every posture change.
    edges = bouts.starts[1:][(bouts.kinds[1:] == SIT) != (bouts.kinds[:-1] == SIT)]
    edges = edges[(edges >= idx[0]) & (edges <= idx[-1])] - idx[0]
    edges = edges[state[edges] <= WALK]  # not while asleep or while the device is off
    if edges.size:
        push = np.zeros((n, 3))
        push[edges] = rng.normal([0.0, 0.25, 0.2], [0.03, 0.05, 0.05], size=(edges.size, 3))
        dyn += _convolve_columns(push, np.hanning(22)[1:-1])

    # Walking: step frequency with a second harmonic, stride (half cadence) sideways.
    w = np.flatnonzero(state == WALK)
    if w.size:
        b = bout[w]
        step = 2 * np.pi * bouts.cadence[b] * idx[w] / SAMPLE_HZ + bouts.phase[b]
        amp = bouts.amp[b]
        dyn[w, 1] += amp * (np.sin(step) + 0.4 * np.sin(2 * step + 0.6))
        dyn[w, 2] += 0.45 * amp * np.sin(step + 1.3)
        dyn[w, 0] += 0.3 * amp * np.sin(0.5 * step)
    return dyn


def _moving_sum(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving sum along axis 0 (edges see fewer samples; margins absorb them)."""
    return _convolve_columns(x, np.ones(width))


def _convolve_columns(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``np.convolve(..., 'same')`` on each column of a 2-D array."""
    return np.stack([np.convolve(x[:, j], kernel, mode="same") for j in range(x.shape[1])], axis=1)


def _window_mode(values: np.ndarray, allowed: tuple[int, ...]) -> np.ndarray:
    """Most frequent value of each window's 100 samples; ties go to the smallest value.

    That is what ``scipy.stats.mode`` returns in the reference pre-processing.
    """
    per_window = values.reshape(-1, SAMPLES_PER_WINDOW)
    counts = np.stack([(per_window == v).sum(axis=1) for v in allowed], axis=1)
    return np.asarray(allowed, dtype=np.int64)[np.argmax(counts, axis=1)]


if __name__ == "__main__":
    raise SystemExit(main())
