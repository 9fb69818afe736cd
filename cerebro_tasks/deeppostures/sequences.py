"""Contiguous segments and T-window sequences from the window table (numpy only).

The stored data keep single 10 s windows (one row per window, ordered by subject and time)
because the sequence length T is a tuned hyperparameter (7 or 9 minutes); sequences are built
here, when a model trains or predicts. Rules: shared/reference/deeppostures.md.

The *window table* is a dict of equal-length numpy arrays for one subject, or several subjects
concatenated in (id, time) order::

    id (N,) str/object   time (N,) int64 epoch s   data (N, 100, 3) float32
    non_wear (N,)        sleeping (N,)             label (N,) int32 (0 sitting, 1 not-sitting, -1 none)

Segments. A window is *excluded* when sleeping == 1 or non_wear == 1, and in training also
when label == -1. A segment is a maximal run of included windows of one subject; an excluded
window or a new subject ends it. As in DeepPostures, timestamps play no part: day files of one
subject are consecutive rows, so segments continue across midnight, including the normal
5-15 s jump between day 1 (which starts at the recording's start second) and day 2 (which
starts at 00:00:00). ``split_on_gaps=True`` also ends a segment wherever consecutive windows
are not exactly 10 s apart: a departure from DeepPostures (other segment numbers, sequences
and predictions), off by default.

No TensorFlow import here: the Spark driver and the CSV writer use it without Keras.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

__all__ = [
    "WINDOW_SECONDS",
    "window_size_for",
    "PADDING_MODES",
    "segment_ids",
    "build_training_sequences",
    "class_weights",
    "sample_weights",
    "build_prediction_sequences",
]

WINDOW_SECONDS = 10
PADDING_MODES = ("drop", "zero", "wrap")
Padding = Literal["drop", "zero", "wrap"]

# Windows gathered per copy step: bounds the temporary of a fancy-index gather (about 20 MB of
# float32 windows, 40 MB when the source is float64 H5 data) while keeping numpy calls few.
_GATHER_CHUNK = 16_384


def window_size_for(window_minutes: float) -> int:
    """Sequence length T (windows per example) for a BiLSTM window of ``window_minutes``.

    ``T = minutes * 60 / 10``: 7 -> 42, 9 -> 54, 3 -> 18. Raises ``ValueError`` unless the
    minutes are positive and cover a whole number of 10 s windows (a silently rounded T would
    train a model on a different window length than the one reported).
    """
    windows = float(window_minutes) * 60.0 / WINDOW_SECONDS
    rounded = round(windows)
    if rounded < 1 or abs(windows - rounded) > 1e-9:
        raise ValueError(
            f"window_minutes={window_minutes!r} is not a positive whole number of "
            f"{WINDOW_SECONDS}-second windows"
        )
    return int(rounded)


def _column(table: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    """One column of the table as an array, checked for length ``n``."""
    try:
        col = np.asarray(table[name])
    except KeyError:
        raise KeyError(f"window table has no {name!r} column") from None
    if col.shape[:1] != (n,):
        raise ValueError(f"column {name!r} has shape {col.shape}, expected ({n}, ...)")
    return col


def segment_ids(
    table: Mapping[str, np.ndarray], *, training: bool, split_on_gaps: bool = False
) -> np.ndarray:
    """Segment index of every window, ``-1`` for excluded windows.

    Segments are numbered 0, 1, 2, ... in table order over the whole table (for a one-subject
    table this is DeepPostures' per-subject ``segment``). In prediction (``training=False``)
    windows without a label are included; in training they are excluded like sleep and non-wear.

    Returns:
        ``(N,)`` int64.
    """
    time = np.asarray(table["time"])
    n = time.shape[0]
    ids = _column(table, "id", n)
    excluded = (_column(table, "sleeping", n) == 1) | (_column(table, "non_wear", n) == 1)
    if training:
        excluded |= _column(table, "label", n) == -1
    included = ~excluded

    starts = included.copy()
    if n > 1:
        continues = included[:-1] & (ids[1:] == ids[:-1])
        if split_on_gaps:
            continues &= np.diff(time) == WINDOW_SECONDS
        starts[1:] &= ~continues
    seg = np.cumsum(starts, dtype=np.int64) - 1
    seg[excluded] = -1
    return seg


def _layout(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of included windows, their segment, and each segment's length and first offset.

    ``rows[first[s] : first[s] + length[s]]`` are the table rows of segment ``s``.
    """
    rows = np.flatnonzero(seg >= 0)
    s = seg[rows]
    n_seg = int(s[-1]) + 1 if rows.size else 0
    length = np.bincount(s, minlength=n_seg).astype(np.int64)
    first = np.cumsum(length) - length
    return rows, s, length, first


def _gather(data: np.ndarray, src: np.ndarray) -> np.ndarray:
    """``data[src]`` as float32 with zero windows where ``src == -1``: the one copy of X.

    Chunked, so a float64 source never materialises as a second full-size array.
    """
    out = np.zeros(src.shape + data.shape[1:], dtype=np.float32)
    flat_out = out.reshape((-1,) + data.shape[1:])
    flat_src = src.reshape(-1)
    pos = np.flatnonzero(flat_src >= 0)
    for i in range(0, pos.size, _GATHER_CHUNK):
        p = pos[i : i + _GATHER_CHUNK]
        flat_out[p] = data[flat_src[p]]
    return out


def _check_window_size(window_size: int) -> int:
    t = int(window_size)
    if t < 1 or t != window_size:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    return t


def build_training_sequences(
    table: Mapping[str, np.ndarray], window_size: int, *, split_on_gaps: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping T-window training examples, remainder of each segment dropped.

    Segments use the training rules (sleep, non-wear and unlabelled windows excluded). Each
    segment of length L gives ``L // T`` examples of consecutive windows; the last ``L % T``
    windows are dropped, as in DeepPostures' training reader.

    Returns:
        ``X`` ``(n, T, 100, 3)`` float32 and ``y`` ``(n, T)`` int32, in table order.
    """
    t = _check_window_size(window_size)
    seg = segment_ids(table, training=True, split_on_gaps=split_on_gaps)
    n = seg.shape[0]
    data = _column(table, "data", n)
    label = _column(table, "label", n)
    rows, s, length, first = _layout(seg)
    pos = np.arange(rows.size, dtype=np.int64) - first[s]  # position inside its segment
    kept = rows[pos < (length // t * t)[s]]
    src = kept.reshape(-1, t)
    return _gather(data, src), label[src].astype(np.int32)


def class_weights(y: np.ndarray) -> dict[int, float]:
    """Balanced class weights ``n / (k * count_c)`` over the classes present in ``y``.

    Negative labels (no label) are ignored. With them, every class contributes the same total
    weight to the loss, the usual counter to DeepPostures' ~80 % sitting imbalance.
    """
    y = np.asarray(y).reshape(-1)
    y = y[y >= 0].astype(np.int64)
    if y.size == 0:
        return {}
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    k = present.size
    return {int(c): float(y.size / (k * counts[c])) for c in present}


def sample_weights(y: np.ndarray, class_weight: Mapping[int, float]) -> np.ndarray:
    """Per-step weights ``(n, T)`` float32 from a class-weight dict.

    Keras' ``class_weight`` argument does not work for 3-D targets (one label per step), so the
    trainer passes these as ``sample_weight`` instead. Negative labels get weight 0 (masked).

    Raises:
        ValueError: a non-negative label of ``y`` has no weight in ``class_weight``.
    """
    y = np.asarray(y).astype(np.int64)
    labelled = y >= 0
    present = np.unique(y[labelled])
    missing = [int(c) for c in present if int(c) not in class_weight]
    if missing:
        raise ValueError(f"labels {missing} have no entry in class_weight {dict(class_weight)}")
    size = max([int(k) for k in class_weight] + [int(present.max()) if present.size else 0]) + 1
    lut = np.zeros(size, dtype=np.float32)
    for c, w in class_weight.items():
        if int(c) >= 0:
            lut[int(c)] = w
    return np.where(labelled, lut[np.where(labelled, y, 0)], 0.0).astype(np.float32)


def build_prediction_sequences(
    table: Mapping[str, np.ndarray],
    window_size: int,
    padding: Padding = "drop",
    *,
    split_on_gaps: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """T-window sequences covering the predictable windows of one subject.

    Prediction excludes only sleep and non-wear (unlabelled windows are predicted). Each segment
    is cut into chunks of T consecutive windows; its tail of ``r = L % T`` windows is handled by
    ``padding``, as DeepPostures' ``make_predictions.py --padding``:

    * ``drop`` (default): no sequence for the tail; those windows are not predicted.
    * ``zero``: one more sequence, the ``r`` tail windows followed by ``T - r`` zero windows.
    * ``wrap``: one more sequence, the segment's last T windows; only its last ``r`` steps are
      new (the first ``T - r`` were predicted by the previous chunk and are not written again).
      A segment shorter than T has no "last T windows": it is treated like ``zero`` (DeepPostures
      has no defined result there: its wrap code splits the segment into 0 sequences).

    Returns:
        ``X`` ``(n, T, 100, 3)`` float32, and ``index`` ``(n, T)`` int64: the table row whose
        prediction step ``[i, t]`` gives, or ``-1`` where the step is not written (zero padding, or
        wrap context). Every predicted row appears exactly once in ``index``, chunks in table order,
        so ``index[index >= 0]`` is increasing.
    """
    t = _check_window_size(window_size)
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    seg = segment_ids(table, training=False, split_on_gaps=split_on_gaps)
    n = seg.shape[0]
    data = _column(table, "data", n)
    rows, _, length, first = _layout(seg)

    n_full = length // t
    rem = length % t
    tail = (rem > 0) if padding != "drop" else np.zeros_like(rem, dtype=bool)
    n_chunks = n_full + tail
    chunk_seg = np.repeat(np.arange(length.size), n_chunks)
    chunk_no = np.arange(chunk_seg.size, dtype=np.int64) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    seg_len = length[chunk_seg]
    is_tail = chunk_no == n_full[chunk_seg]  # only tail chunks reach j == n_full
    wrapped = is_tail & (padding == "wrap") & (seg_len >= t)
    start = np.where(wrapped, seg_len - t, chunk_no * t)

    steps = np.arange(t, dtype=np.int64)
    offset = start[:, None] + steps[None, :]  # position inside the segment
    real = offset < seg_len[:, None]
    src = np.where(real, rows[first[chunk_seg][:, None] + np.minimum(offset, seg_len[:, None] - 1)], -1)
    index = src.copy()
    # Wrap context: steps before the last r were already written by the previous chunk.
    index[wrapped[:, None] & (steps[None, :] < (t - rem[chunk_seg])[:, None])] = -1
    return _gather(data, src), index.astype(np.int64)
