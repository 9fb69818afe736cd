"""The CHAP prediction CSV: one subject's per-window predictions in DeepPostures' format.

Format (shared/reference/deeppostures.md, "Predictions"), as written by DeepPostures'
``MSSE-2021/make_predictions.py``::

    segment,timestamp,prediction            (or segment,timestamp,label,prediction)
    0,2024-01-01 10:00:00,sitting
    0,2024-01-01 10:00:10,not-sitting
    ...

* ``segment``: 0-based index of the contiguous run of windows with no sleep and no non-wear
  (:func:`cerebro_tasks.deeppostures.sequences.segment_ids` with ``training=False``). Numbers count every
  run, also runs that produced no rows (shorter than T with ``padding="drop"``), exactly like
  DeepPostures, so numbers may skip.
* ``timestamp``: window start, ``%Y-%m-%d %H:%M:%S``. DeepPostures formats with
  ``datetime.fromtimestamp(t)``, i.e. in the *process-local* time zone; its pre-processing made
  ``t`` with ``time.mktime`` of the device's naive wall-clock time, so the round trip prints the
  device's wall clock when both ran in the same zone. Here the zone is the study's (recorded in
  the dataset at conversion, :mod:`cerebro_tasks.deeppostures.clock`), passed as ``timezone``,
  so the CSV matches what DeepPostures prints on a machine in that zone, whatever the ``TZ`` of
  the Spark executor that writes it. ``timezone=None`` formats in the process-local zone.
* ``label`` / ``prediction``: class names from the study's label map, ``-1`` is ``no-label``;
  by default DeepPostures' ``{0: "sitting", 1: "not-sitting", -1: "no-label"}``.
* An ensemble (:func:`predict_subject_ensemble`, DeepPostures' CHAP) writes the majority vote of
  its members per window; each member builds its own T-window sequences.
* Sleep and non-wear windows are not written; the tail of each segment follows ``padding``
  (:func:`cerebro_tasks.deeppostures.sequences.build_prediction_sequences`).

Nothing here imports TensorFlow: the model enters as ``predict_fn(X)``; a Keras model's
``predict_on_batch`` fits directly.
"""

from __future__ import annotations

import os
import time as _time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cerebro_tasks.deeppostures.sequences import Padding, build_prediction_sequences, segment_ids

__all__ = [
    "CHAP_LABELS",
    "TIMESTAMP_FORMAT",
    "to_class_ids",
    "format_timestamps",
    "predict_subject",
    "predict_subject_ensemble",
    "csv_bytes",
    "write_csv",
]

CHAP_LABELS: dict[int, str] = {0: "sitting", 1: "not-sitting", -1: "no-label"}
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

PredictFn = Callable[[np.ndarray], Any]


def to_class_ids(output: Any, shape: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Turn a ``predict_fn`` result into ``(n, T)`` class ids.

    Accepted: integer/bool ``(n, T)`` class ids; ``(n, T, C)`` scores with ``C >= 2`` (argmax,
    so logits and probabilities alike); ``(n, T, 1)`` or float ``(n, T)``: one probability of
    class 1 (not-sitting), compared with ``threshold``. Anything else raises ``ValueError``.
    """
    out = np.asarray(output)
    n, t = shape
    if out.ndim == 3 and out.shape[:2] == (n, t):
        if out.shape[2] >= 2:
            return np.argmax(out, axis=-1).astype(np.int64)
        if out.shape[2] == 1:
            out = out[..., 0]
    if out.shape != (n, t):
        raise ValueError(f"predict_fn returned shape {out.shape}, expected ({n}, {t}[, C])")
    if np.issubdtype(out.dtype, np.integer) or out.dtype == np.bool_:
        return out.astype(np.int64)
    return (out > threshold).astype(np.int64)


def format_timestamps(epoch_seconds: np.ndarray, timezone: str | None = "UTC") -> np.ndarray:
    """Epoch seconds -> ``%Y-%m-%d %H:%M:%S`` strings (object array), vectorised.

    ``timezone``: ``"UTC"`` (default) or an IANA name; ``None`` = process-local time, identical
    to DeepPostures' ``datetime.fromtimestamp(t).strftime(...)`` (DST included).
    """
    t = np.asarray(epoch_seconds)
    if t.size == 0:
        return np.array([], dtype=object)
    # Whole seconds, as DeepPostures prints them (strftime drops the fraction).
    secs = np.floor(t).astype(np.int64)
    if timezone is None:
        # The C library's localtime, exactly what datetime.fromtimestamp uses (DST included).
        # One call per window is ~0.4 us; pandas' tzlocal path is ~100x slower.
        offset = np.fromiter((_time.localtime(x).tm_gmtoff for x in secs.tolist()), np.int64, secs.size)
        wall = pd.to_datetime(secs + offset, unit="s")
    else:
        wall = pd.to_datetime(secs, unit="s", utc=True).tz_convert(timezone)
    return wall.strftime(TIMESTAMP_FORMAT).to_numpy(dtype=object)


def predict_subject(
    table: Mapping[str, np.ndarray],
    predict_fn: PredictFn,
    *,
    window_size: int,
    **options: Any,
) -> pd.DataFrame:
    """Predict every predictable window of ONE subject with one model; the CHAP CSV rows.

    ``predict_fn``: ``X (b, T, 100, 3) float32 -> (b, T, C) scores | (b, T, 1) probability of
    class 1 | (b, T) class ids`` (see :func:`to_class_ids`); ``window_size``: its T. The options
    are :func:`predict_subject_ensemble`'s.
    """
    return predict_subject_ensemble(table, [(predict_fn, window_size)], **options)


def predict_subject_ensemble(
    table: Mapping[str, np.ndarray],
    members: Sequence[tuple[PredictFn, int]],
    *,
    padding: Padding = "drop",
    include_label: bool = False,
    include_segment: bool = True,
    batch_size: int = 256,
    timezone: str | None = "UTC",
    label_map: Mapping[int, str] | None = None,
    threshold: float = 0.5,
    split_on_gaps: bool = False,
) -> pd.DataFrame:
    """Predict every predictable window of ONE subject by majority vote of ``members``.

    Args:
        table: window table of one subject in time order (see :mod:`cerebro_tasks.deeppostures.sequences`).
        members: ``(predict_fn, T)`` per model, best-ranked first (see :func:`predict_subject`).
            Each is called once per ``batch_size`` of its own sequences, so memory stays bounded
            for long recordings. One member: its predictions as they are.
        padding: tail handling, ``"drop"`` | ``"zero"`` | ``"wrap"``. A window is written when
            every member predicts it (with ``drop``, members of different T drop different tails).
        include_label: add the ``label`` column (``segment,timestamp,label,prediction``).
        include_segment: ``False`` drops the ``segment`` column (DeepPostures' ``--no-segment``).
        batch_size: sequences per ``predict_fn`` call.
        timezone: the study's zone, see :func:`format_timestamps`.
        label_map: class id -> name; default :data:`CHAP_LABELS`.
        threshold: decision threshold for single-probability outputs.
        split_on_gaps: see :func:`cerebro_tasks.deeppostures.sequences.segment_ids`.

    Returns:
        DataFrame with columns ``segment,timestamp[,label],prediction``, one row per predicted
        window in time order (empty, with the columns, when nothing is predictable). The vote:
        the class most members give; a tie goes to the best-ranked member among the tied classes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if not members:
        raise ValueError("predict_subject_ensemble needs at least one (predict_fn, window_size)")
    names = dict(CHAP_LABELS if label_map is None else label_map)
    ids = np.asarray(table["id"])
    if ids.size and np.any(ids[1:] != ids[:-1]):
        raise ValueError("predict_subject takes the window table of one subject")

    n_rows = len(np.asarray(table["time"]))
    votes = np.full((len(members), n_rows), -1, dtype=np.int64)  # -1: this member did not predict it
    for m, (predict_fn, window_size) in enumerate(members):
        X, index = build_prediction_sequences(table, window_size, padding, split_on_gaps=split_on_gaps)
        n, t = index.shape
        classes = np.empty((n, t), dtype=np.int64)
        for i in range(0, n, batch_size):
            batch = X[i : i + batch_size]  # a view: no copy of X
            classes[i : i + batch_size] = to_class_ids(predict_fn(batch), (batch.shape[0], t), threshold)
        written = index >= 0
        votes[m, index[written]] = classes[written]

    rows = np.flatnonzero((votes >= 0).all(axis=0))
    preds = _majority(votes[:, rows])

    columns: dict[str, Any] = {}
    if include_segment:
        columns["segment"] = segment_ids(table, training=False, split_on_gaps=split_on_gaps)[rows]
    columns["timestamp"] = format_timestamps(np.asarray(table["time"])[rows], timezone)
    if include_label:
        labels = np.asarray(table["label"])[rows].astype(np.int64)
        columns["label"] = _names(labels, names)
    columns["prediction"] = _names(preds, names)
    return pd.DataFrame(columns)


def _majority(votes: np.ndarray) -> np.ndarray:
    """Per column of ``(members, n)`` class ids: the most frequent; ties to the earliest member's."""
    if votes.shape[0] == 1 or votes.shape[1] == 0:
        return votes[0].copy() if votes.shape[0] else np.empty(0, np.int64)
    k = int(votes.max()) + 1
    counts = np.zeros((k, votes.shape[1]), dtype=np.int64)
    for row in votes:
        counts[row, np.arange(votes.shape[1])] += 1
    top = counts.max(axis=0)
    out = np.full(votes.shape[1], -1, dtype=np.int64)
    for row in votes:  # best-ranked first: the first member whose class has the top count decides
        pick = (out < 0) & (counts[row, np.arange(votes.shape[1])] == top)
        out[pick] = row[pick]
    return out


def _names(ids: np.ndarray, names: Mapping[int, str]) -> np.ndarray:
    """Vectorised id -> name lookup (object array); an id without a name raises ``ValueError``."""
    known = np.isin(ids, np.fromiter(names.keys(), dtype=np.int64, count=len(names)))
    if not known.all():
        raise ValueError(f"ids {sorted(set(ids[~known].tolist()))} have no name in {dict(names)}")
    out = np.empty(ids.shape, dtype=object)
    for k, v in names.items():
        out[ids == k] = v
    return out


def csv_bytes(df: pd.DataFrame) -> bytes:
    """The CSV as written: no index, ``\\n`` line ends, UTF-8."""
    return df.to_csv(index=False, lineterminator="\n").encode("utf-8")


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write ``df`` so that readers never see a partial file (the store's write-then-rename)."""
    from cerebro_tasks.storage.store import Store

    path = os.path.abspath(os.fspath(path))
    Store(os.path.dirname(path)).write_bytes(csv_bytes(df), os.path.basename(path))
