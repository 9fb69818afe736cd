"""A model's checkpoints in the run store: the state a hop moves, and the whole model at epoch ends.

A hop needs only what training changed: the model's weights and its optimizer's state. After every
train unit the worker writes them as ``ckpt-<step>.state``, a flat file of the raw variables (a
JSON header of shapes and dtypes, then the bytes), which is read back at the speed of the disk;
Keras's own ``.keras`` file costs several times more to write and read because of its per-variable
HDF5 inside a zip. A worker that already holds the model's graph built, compiled and traced
(mop/model_cache.py) reads the state into it; one that meets the graph for the first time builds
the model with the workload's ``build_model`` and then reads the state. The whole ``.keras`` model is
written at the end of every epoch (``ckpt-<step>.keras``), where results and the export read it;
no unit reads it, so a worker writes it behind its next unit (mop/worker.py). Names come from
storage/layout.py; every file is published atomically.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Any

import numpy as np

from cerebro_tasks.storage.layout import checkpoint_name, state_name
from cerebro_tasks.storage.store import Store

MAGIC = b"CBSTATE1"  # format name and version
_LENGTH = struct.Struct("<Q")


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model it is read into, or is not a checkpoint at all."""


def state_variables(model: Any) -> list[Any]:
    """What a hop moves, in a fixed order: the model's weights, then its optimizer's variables."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return list(model.weights)
    if not optimizer.built:
        # a model that has not trained yet has no optimizer slots: make them, so states line up
        optimizer.build(model.trainable_variables)
    return list(model.weights) + list(optimizer.variables)


def state_bytes(model: Any) -> int:
    """Bytes of what a hop moves for `model`."""
    return sum(int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in state_variables(model))


def encode_state(model: Any) -> bytes:
    variables = state_variables(model)
    arrays = [np.asarray(v.numpy()) for v in variables]  # tobytes() below writes C order
    header = json.dumps([{"path": str(getattr(v, "path", v.name)), "shape": list(a.shape), "dtype": a.dtype.str}
                         for v, a in zip(variables, arrays)]).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(header)), header, *(a.tobytes() for a in arrays)])


def decode_into(model: Any, data: bytes, where: str) -> None:
    """Assign the state in `data` to `model`'s variables, after checking every shape and dtype."""
    if data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{where}: not a model state file (expected the {MAGIC.decode()} format)")
    start = len(MAGIC) + _LENGTH.size
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    entries = json.loads(data[start:start + length])
    variables = state_variables(model)
    if len(entries) != len(variables):
        raise CheckpointError(f"{where}: holds {len(entries)} variables, model {getattr(model, 'name', '')!r} "
                              f"has {len(variables)}; the checkpoint is of another architecture or optimizer")
    offset = start + length
    arrays = []
    for e, v in zip(entries, variables):
        dtype = np.dtype(e["dtype"])
        if tuple(e["shape"]) != tuple(v.shape) or dtype != np.dtype(v.dtype):
            raise CheckpointError(f"{where}: variable {e['path']} is {dtype.name}{tuple(e['shape'])}, the model's "
                                  f"{getattr(v, 'path', v.name)} is {np.dtype(v.dtype).name}{tuple(v.shape)}")
        count = int(np.prod(e["shape"], dtype=np.int64))
        arrays.append(np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(e["shape"]))
        offset += count * dtype.itemsize
    if offset != len(data):
        raise CheckpointError(f"{where}: {len(data) - offset} bytes more than its header describes (truncated "
                              "or corrupt)")
    for v, a in zip(variables, arrays):
        v.assign(a)


def save_state(store: Store, model: Any, model_id: str, step: int, attempt: str | None = None) -> bytes:
    """Write ``ckpt-<step>.state`` of `model_id` atomically (``ckpt-<step>.<attempt>.state`` for one
    dispatch of a unit, which the driver renames once it accepts the unit); returns what it wrote."""
    data = encode_state(model)
    store.write_bytes(data, *state_name(model_id, step, attempt))
    return data


def load_state(store: Store, model: Any, model_id: str, step: int) -> None:
    """Overwrite a built model's weights and optimizer state with those `model_id` had after `step`.

    The model keeps its compiled and traced train/eval functions: they read the same variables,
    so training on afterwards is exactly training a model freshly loaded from the checkpoint.
    A run written before state files existed has only ``.keras`` checkpoints: those are read.
    """
    parts = state_name(model_id, step)
    if not store.exists(*parts) and store.exists(*checkpoint_name(model_id, step)):
        state_variables(model)  # the optimizer's slots must exist to receive the saved ones
        with store.local_copy(*checkpoint_name(model_id, step)) as path:
            model.load_weights(path)
        return
    decode_into(model, store.read_bytes(*parts), store.url_of(*parts))


def save_checkpoint(store: Store, model: Any, model_id: str, step: int, attempt: str | None = None) -> None:
    """Write the whole model as ``ckpt-<step>.keras`` (``attempt`` as for :func:`save_state`): a
    reader sees no file or the whole new one."""
    parts = checkpoint_name(model_id, step, attempt)
    if store.is_local:
        final = store.path(*parts)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = os.path.join(os.path.dirname(final), f".tmp-{os.getpid()}-{os.path.basename(final)}")  # layout.PARTIAL
        try:
            model.save(tmp)
            os.replace(tmp, final)  # atomic: a reader sees the old state or the whole new file
        except BaseException:
            if os.path.exists(tmp):  # a save that failed half-way leaves nothing behind
                os.remove(tmp)
            raise
        return
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, parts[-1])
        model.save(local)
        store.put_file(local, *parts)
