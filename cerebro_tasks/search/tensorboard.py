"""TensorBoard logs of a search: one run folder per model with its hyperparameters and per-epoch scalars.

Layout: ``<run_url>/tb/<model_id>/events.out.tfevents.*``, so ``tensorboard --logdir <store>/runs``
lists every model of every search as ``<run_id>/tb/<model_id>`` and the HParams dashboard shows
one row per model (its configuration plus the last value of each scalar).

The events are written with TensorBoard's own pure-Python writer, not ``tf.summary``: the search
driver never has to import TensorFlow for this, and a driver on a GPU machine does not grab the
card that the MOP workers need. The records are the same ones ``tf.summary.scalar`` and
``hp.hparams`` write (tensor scalars with the ``scalars`` plugin tag, the ``hparams`` session
start), so TensorBoard, ``EventAccumulator`` and ``tf.compat.v1.train.summary_iterator`` read them.

Each call writes one event file locally, copies it into a temporary sibling of ``tb/<model_id>``
and renames that over the model's folder: calling again (a resumed run) replaces the model's logs
instead of duplicating its points, a reader never sees half a folder, and remote stores (HDFS) get
the same files as local ones. (TensorBoard's ``EventFileWriter`` would import TensorFlow for its
file I/O; the records are framed here with TensorBoard's own ``RecordWriter`` instead.)
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
import uuid
from typing import Any, Mapping

from cerebro_tasks.storage.store import Store
from cerebro_tasks.storage import layout

log = logging.getLogger("cerebro_tasks.search")

TB_DIR = layout.TB_DIR

__all__ = ["TB_DIR", "write_tensorboard", "hparam_value"]


def hparam_value(value: Any) -> bool | int | float | str:
    """A value the HParams plugin accepts (bool, number or string); anything else as its string."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalars
        return hparam_value(value.item())
    return str(value)


def write_tensorboard(run_url: str, model_id: str, params: Mapping[str, Any],
                      history: Mapping[str, list[float]], metric: str | None = None,
                      notes: Mapping[str, tuple[int, str]] | None = None) -> str:
    """Write one model's hyperparameters and per-epoch scalars under ``<run_url>/tb/<model_id>/``.

    ``history`` maps a tag (``train_loss``, ``val_accuracy``, ...) to one value per epoch; epoch
    ``e`` (0-based) is written at step ``e + 1``, as Cerebro did. NaN values (an epoch a model did
    not reach) are skipped. ``metric`` names the selection metric: when given, it is also written as
    ``selection/<metric>`` at the last epoch, so the HParams table has one column to sort by, and a
    warning says when the history lacks it. ``notes`` maps a tag to (1-based epoch, text), shown
    in TensorBoard's Text tab (e.g. where and why early stopping stopped the model). Returns the
    URL of the model's log folder.
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import summary_v2 as hparams_summary
    from tensorboard.plugins.scalar import summary_v2 as scalar_summary
    from tensorboard.plugins.text import summary_v2 as text_summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    if not model_id or "/" in model_id:
        raise ValueError(f"model_id must be a non-empty name without '/', got {model_id!r}")
    store = Store(run_url)
    hparams = {str(k): hparam_value(v) for k, v in params.items()}
    now = time.time()
    events = [event_pb2.Event(wall_time=now, file_version="brain.Event:2"),
              event_pb2.Event(wall_time=now, step=0, summary=hparams_summary.hparams_pb(hparams, trial_id=model_id))]
    for tag in sorted(history):
        for epoch, value in enumerate(history[tag]):
            if value is not None and not math.isnan(float(value)):
                events.append(event_pb2.Event(wall_time=now, step=epoch + 1,
                                              summary=scalar_summary.scalar_pb(tag, float(value))))
    if metric is not None:
        series = [v for v in history.get(metric, []) if v is not None and not math.isnan(float(v))]
        if series:
            events.append(event_pb2.Event(wall_time=now, step=len(history[metric]),
                                          summary=scalar_summary.scalar_pb(f"selection/{metric}", float(series[-1]))))
        else:
            log.warning("TensorBoard: model %s has no value for the selection metric %r (has %s)",
                        model_id, metric, sorted(history))
    for tag, (step, text) in sorted((notes or {}).items()):
        events.append(event_pb2.Event(wall_time=now, step=int(step), summary=text_summary.text_pb(tag, str(text))))
    # TensorBoard's file name pattern: events.out.tfevents.<time>.<host>.<pid>.<n>
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().int % 10**6}"
    with tempfile.TemporaryDirectory(prefix="cerebro-tb-") as local:
        path = os.path.join(local, name)
        writer = RecordWriter(open(path, "wb"))
        try:
            for event in events:
                writer.write(event.SerializeToString())
        finally:
            writer.close()
        store.put_tree(local, TB_DIR, model_id)  # the model's log folder holds exactly this file
    return store.url_of(TB_DIR, model_id)
