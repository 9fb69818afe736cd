"""When data arrived: the dataset as of an instant, and the subjects that arrived in an interval.

A file's arrival is the modification time its conversion recorded (``mtime_ns`` of each file in
``_cerebro_manifest.json``): when it landed in the H5 tree. That is what gives a run for a past
logical date a meaning (README, "Scheduled runs and backfills"): the run for the interval
[start, end) trains on the files that had arrived before ``end`` and predicts the subjects with a
file arriving in [start, end). A copy that keeps the source's times (``rsync -a``, ``cp -p``)
keeps the source's arrival; ``touch`` a file to make it arrive now.
"""

from __future__ import annotations

import datetime as _dt
from typing import Mapping

__all__ = ["to_ns", "files_as_of", "arrived_subjects", "manifest_files"]


def to_ns(instant: str | _dt.datetime) -> int:
    """An ISO-8601 instant (with a zone; none means UTC) as nanoseconds since the epoch."""
    when = _dt.datetime.fromisoformat(instant) if isinstance(instant, str) else instant
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    delta = when - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def files_as_of(files: Mapping[str, dict], as_of_ns: int | None) -> dict[str, dict]:
    """The manifest's file entries that had arrived before ``as_of_ns`` (all of them for None)."""
    if as_of_ns is None:
        return dict(files)
    return {rel: e for rel, e in files.items() if int(e["mtime_ns"]) < as_of_ns}


def arrived_subjects(files: Mapping[str, dict], since_ns: int, until_ns: int) -> list[str]:
    """Subjects with at least one file arriving in [since_ns, until_ns): new subjects and new days."""
    return sorted({e["subject"] for e in files.values() if since_ns <= int(e["mtime_ns"]) < until_ns})


def manifest_files(dataset_url: str) -> dict[str, dict]:
    """The converted files of a dataset (``{rel: entry}``), empty before its first conversion."""
    from cerebro_tasks.deeppostures.petastorm_io import MANIFEST_NAME
    from cerebro_tasks.storage.store import Store

    store = Store(dataset_url)
    return dict(store.read_json(MANIFEST_NAME).get("files", {})) if store.exists(MANIFEST_NAME) else {}
