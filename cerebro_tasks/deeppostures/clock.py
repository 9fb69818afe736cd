"""The study's clock: its time zone, local days, daylight-saving changes (no Spark, no Keras).

DeepPostures' pre-processing turns the device's wall-clock timestamps (no zone) into epoch
seconds with ``time.mktime`` in the pre-processing machine's local zone, and its prediction step
turns them back with ``datetime.fromtimestamp`` in that zone (shared/reference/deeppostures.md,
"Time zone"). So a study's ``time`` is only meaningful with that zone: this module holds what
follows from it.

* :func:`check_zone`: an IANA name (``UTC``, ``America/Los_Angeles``, ``Australia/Sydney``).
* :func:`day_bounds`: a file's calendar date in the zone, as ``[start, end)`` epoch seconds
  (23 or 25 hours on a daylight-saving day).
* :func:`wall_to_epoch`: what ``time.mktime`` makes of naive wall-clock seconds in the zone
  (``tm_isdst=-1``: an hour the zone skips is read with the offset before the change, an hour it
  repeats with the first, daylight offset; checked against the C library in the tests).
* :func:`offset_changes`: the zone's offset changes inside an interval.
* :func:`zones_that_fit`: which zones put every window of some files inside their dates (the
  suggestion when the configured zone does not fit a study).

Daylight-saving changes, decided here (what :func:`cerebro_tasks.deeppostures.h5format.read_h5`
enforces and the conversion reports):

* **The zone repeats an hour** (autumn): ``mktime`` reads the repeated wall hour once, with the
  daylight offset, so ``time`` jumps forward by an hour and 10 s at the change. The windows stay
  in order, nothing collides: the file is kept exactly as DeepPostures reads it and the
  conversion report names the file and the window at the change (``dst_changes``).
* **The zone skips an hour** (spring): the device still records that wall hour, and ``mktime``
  gives its windows the epoch seconds of the next hour's windows, so ``time`` steps back by
  3,590 s and an hour of windows shares its timestamps with the next. No order by time can
  place them, so the file is quarantined, naming the change and the windows, rather than kept
  with windows that a reader sorting by time would interleave.
"""

from __future__ import annotations

import datetime as _dt
import functools
from typing import Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import numpy as np

__all__ = ["DEFAULT_ZONE", "check_zone", "zone_info", "day_bounds", "utc_offset", "wall_to_epoch", "offset_changes", "zones_that_fit",
           "COMMON_STUDY_ZONES"]

DEFAULT_ZONE = "UTC"
_DAY = 86_400
# Where studies are pre-processed (US, Australia, Europe): tried first when suggesting a zone.
COMMON_STUDY_ZONES = ("UTC", "America/Los_Angeles", "America/Denver", "America/Phoenix", "America/Chicago",
                      "America/New_York", "Australia/Sydney", "Australia/Brisbane", "Australia/Adelaide",
                      "Australia/Perth", "Europe/London", "Europe/Berlin", "Asia/Tokyo")


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def zone_info(name: str) -> ZoneInfo:
    """The ``tzinfo`` of an IANA name (cached)."""
    return _zone(name)


def check_zone(name: object) -> str:
    """``name`` if it is a time zone the system knows (IANA name), else ``ValueError`` naming it."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"time zone: expected an IANA name such as 'UTC' or 'America/Los_Angeles', got {name!r}")
    try:
        _zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"time zone: expected an IANA name such as 'UTC' or 'America/Los_Angeles', "
                         f"got {name!r} (unknown zone)") from None
    return name


def day_bounds(date: _dt.date, zone: str) -> tuple[int, int]:
    """Epoch seconds of local 00:00 on ``date`` and on the next day, in ``zone``."""
    tz = _zone(zone)
    nxt = date + _dt.timedelta(days=1)
    start = _dt.datetime(date.year, date.month, date.day, tzinfo=tz).timestamp()
    end = _dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).timestamp()
    return int(start), int(end)


def wall_to_epoch(wall: np.ndarray, zone: str) -> np.ndarray:
    """Naive wall-clock seconds (a wall time read as if it were UTC) -> epoch seconds in ``zone``,
    as ``time.mktime`` with ``tm_isdst=-1`` computes them (Python's ``fold=0``)."""
    wall = np.asarray(wall, dtype=np.float64)
    if wall.size == 0:
        return wall.copy()
    tz = _zone(zone)
    # Offsets change on whole minutes: one zone lookup per distinct minute, not per window.
    minutes, inverse = np.unique(np.floor(wall / 60).astype(np.int64), return_inverse=True)
    epoch0 = _dt.datetime(1970, 1, 1)
    offsets = np.array([(epoch0 + _dt.timedelta(minutes=int(m))).replace(tzinfo=tz).utcoffset().total_seconds()
                        for m in minutes.tolist()])
    return wall - offsets[inverse.reshape(wall.shape)]


def _offset_at(epoch: float, tz: ZoneInfo) -> int:
    return int(_dt.datetime.fromtimestamp(epoch, tz).utcoffset().total_seconds())


def utc_offset(epoch: float, zone: str) -> int:
    """Seconds ``zone`` is ahead of UTC at ``epoch`` (-28800 for Los Angeles in winter)."""
    return _offset_at(float(epoch), _zone(zone))


def offset_changes(start: int, end: int, zone: str) -> list[tuple[int, int]]:
    """``(epoch, change in seconds)`` of every offset change of ``zone`` in ``[start, end)``:
    +3600 when clocks go forward, -3600 when they go back. Found by bisection on 15-minute steps
    (zones change offsets at most a few times a year, never twice within 15 minutes)."""
    tz = _zone(zone)
    out: list[tuple[int, int]] = []
    step = 900
    t = int(start)
    before = _offset_at(t, tz)
    while t < end:
        nxt = min(t + step, int(end))
        after = _offset_at(nxt, tz)
        if after != before:
            lo, hi = t, nxt  # offset(lo) == before, offset(hi) == after
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _offset_at(mid, tz) == before:
                    lo = mid
                else:
                    hi = mid
            if hi < end:
                out.append((hi, after - before))
            before = after
        t = nxt
    return out


def zones_that_fit(files: Iterable[tuple[_dt.date, float, float]], candidates: Iterable[str] | None = None
                   ) -> list[str]:
    """The zones (common study zones first, then every zone the system knows, sorted) in which
    each ``(date, first window start, last window start)`` lies inside its local date."""
    files = list(files)
    names = list(COMMON_STUDY_ZONES) if candidates is None else list(candidates)
    if candidates is None:
        names += sorted(z for z in available_timezones() if z not in COMMON_STUDY_ZONES
                        and not z.startswith(("Etc/", "SystemV/", "posix/", "right/")))
    fits = []
    for name in names:
        try:
            ok = all(lo <= first and last < hi for (lo, hi), (_, first, last)
                     in zip((day_bounds(d, name) for d, _, _ in files), files))
        except (ZoneInfoNotFoundError, ValueError):
            continue
        if ok:
            fits.append(name)
    return fits
