"""The MOP worker: a long-lived Spark barrier task that owns one data partition and runs units.

It connects back to the driver over an authenticated channel, says which partition it owns, and
then runs whatever unit the driver pushes: load the model's checkpoint (unless it already holds
that exact version in memory), train one sub-epoch or evaluate, write the next checkpoint
atomically, report. Data is read once per worker and reused by every model that hops in.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from multiprocessing.connection import Client
from typing import Any, Iterable, Iterator

from cerebro_tasks.mop.control import Message
from cerebro_tasks.mop.scheduler import Unit
from cerebro_tasks.mop.workload import ModelSpec, Workload
from cerebro_tasks.storage.layout import checkpoint_name
from cerebro_tasks.storage.store import Store


def configure_devices(gpu_addresses: list[str], cpus: int) -> dict[str, Any]:
    """Pin TensorFlow to this task's GPU(s), or limit its threads to the task's cores.

    Must run before TensorFlow initialises its devices: CUDA_VISIBLE_DEVICES is read once. Memory
    growth stops one worker's TensorFlow from reserving the whole card.
    """
    wanted = ",".join(gpu_addresses)
    if gpu_addresses and "tensorflow" in sys.modules and os.environ.get("CUDA_VISIBLE_DEVICES") != wanted:
        # a reused Python worker whose TensorFlow already saw other devices: it cannot switch now
        logging.getLogger("cerebro_tasks.mop").warning(
            "this Python worker already initialised TensorFlow with CUDA_VISIBLE_DEVICES=%r; Spark assigned GPU(s) %s. "
            "Set spark.python.worker.reuse=false on GPU clusters so that each task starts a fresh worker",
            os.environ.get("CUDA_VISIBLE_DEVICES"), wanted)
    if gpu_addresses:
        os.environ["CUDA_VISIBLE_DEVICES"] = wanted
    else:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in a reused Python worker: keep its setting
            pass
    if not gpus:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, cpus))
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
        except RuntimeError:
            pass
    return {
        "gpu_addresses": list(gpu_addresses),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "tf_gpus": [g.name for g in gpus],
        "cpus": cpus,
    }


def capture_metric_states(model: Any) -> dict[str, dict[str, Any]]:
    """Each compiled metric's additive state after fit/evaluate, for an exact merge over
    partitions (mop/metric_state.py): class name, the config its result needs, its variables."""
    import numpy as np

    from cerebro_tasks.mop.metric_state import CONFIG_KEYS

    out: dict[str, dict[str, Any]] = {}
    for tracked in model.metrics:
        # the loss tracker is a metric of its own; CompileMetrics holds the compiled ones
        inner = tracked.metrics if type(tracked).__name__ == "CompileMetrics" else [tracked]
        for metric in inner:
            config = metric.get_config()
            out[metric.name] = {
                "class": type(metric).__name__,
                "config": {k: config[k] for k in CONFIG_KEYS if k in config},
                "state": {v.name: np.asarray(v).tolist() for v in metric.variables},
            }
    return out


class PartitionError(RuntimeError):
    """This worker's data cannot be read: no model can train here, so the run stops."""


class UnitRunner:
    """Runs units on one partition, keeping the last model in memory to skip needless reloads."""

    def __init__(self, workload: Workload, run_store: Store, partition: int) -> None:
        self.workload = workload
        self.store = run_store
        self.partition = partition
        self._data: dict[str, Any] = {}
        self._held: tuple[str, int, Any] | None = None  # (model_id, step, keras model)

    def data(self, kind: str) -> Any:
        if kind not in self._data:
            try:
                self._data[kind] = self.workload.load_partition(kind, self.partition)
            except Exception as e:
                raise PartitionError(f"{kind} partition {self.partition} could not be read: "
                                     f"{type(e).__name__}: {e}") from e
        return self._data[kind]

    def _model_at(self, spec: ModelSpec, step: int) -> tuple[Any, bool]:
        import keras

        held, self._held = self._held, None  # until the unit succeeds, this worker holds nothing trusted
        if held is not None and held[0] == spec.model_id and held[1] == step:
            return held[2], True
        del held  # free the previous model before building or loading the next one
        keras.backend.clear_session()
        if step == 0:
            keras.utils.set_random_seed(spec.seed)
            model = self.workload.build_model(spec)
        else:
            with self.store.local_copy(*checkpoint_name(spec.model_id, step)) as path:
                model = keras.saving.load_model(path, custom_objects=self.workload.custom_objects())
        return model, False

    def _save(self, model: Any, model_id: str, step: int, attempt: str) -> None:
        parts = checkpoint_name(model_id, step, attempt)  # the driver renames it once it accepts the unit
        if self.store.is_local:
            final = self.store.path(*parts)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = os.path.join(os.path.dirname(final), f".tmp-{os.getpid()}-{os.path.basename(final)}")
            model.save(tmp)
            os.replace(tmp, final)  # atomic: a reader sees the old state or the whole new file
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                local = os.path.join(d, parts[-1])
                model.save(local)
                self.store.put_file(local, *parts)

    def run(self, unit: Unit, spec: ModelSpec, attempt: str) -> dict[str, Any]:
        start = time.time()
        data = self.data(unit.kind)
        model, reused = self._model_at(spec, unit.step)
        loaded = time.time()
        training = unit.kind == "train"
        # a different, reproducible shuffle for every sub-epoch of every model
        inputs = self.workload.inputs(data, spec, training=training, seed=spec.seed * 100_003 + unit.step)
        if inputs.num_samples == 0:
            metrics: dict[str, float] = {}
        elif training:
            hist = model.fit(inputs.x, inputs.y, sample_weight=inputs.sample_weight, batch_size=inputs.batch_size,
                             epochs=1, shuffle=False, verbose=0, callbacks=inputs.extra.get("callbacks"))
            metrics = {k: float(v[-1]) for k, v in hist.history.items()}
        else:
            metrics = {k: float(v) for k, v in model.evaluate(inputs.x, inputs.y, sample_weight=inputs.sample_weight,
                                                                batch_size=inputs.batch_size, verbose=0,
                                                                callbacks=inputs.extra.get("callbacks"),
                                                                return_dict=True).items()}
        states = capture_metric_states(model) if inputs.num_samples else {}
        computed = time.time()
        if training:
            self._save(model, unit.model_id, unit.step + 1, attempt)
            self._held = (unit.model_id, unit.step + 1, model)
        else:
            self._held = (unit.model_id, unit.step, model)
        end = time.time()
        return {
            "metrics": metrics,
            "metric_state": states,
            "num_samples": int(inputs.num_samples),
            "start": start,
            "end": end,
            "load_s": loaded - start,
            "compute_s": computed - loaded,
            "save_s": end - computed,
            "reused_model": reused,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "attempt": attempt,
        }


def serve(address: tuple[str, int], secret: bytes, workload: Workload, run_url: str, partition: int,
          gpu_addresses: list[str], cpus: int) -> dict[str, Any]:
    """Connect to the driver and run pushed units until told to stop. Returns this worker's summary."""
    devices = configure_devices(gpu_addresses, cpus)
    runner = UnitRunner(workload, Store(run_url), partition)
    conn = Client(address, authkey=secret)
    conn.send(Message.hello(partition, {"host": socket.gethostname(), "pid": os.getpid(), **devices}))
    units = 0
    try:
        while True:
            msg = conn.recv()
            if msg.kind == "stop":
                break
            unit, spec = msg.payload["unit"], msg.payload["spec"]
            try:
                result = runner.run(unit, spec, msg.payload["attempt"])
            except PartitionError as e:  # a data fault, not a model fault: say so once and stop
                conn.send(Message.fatal(unit, str(e)))
                break
            except Exception:  # report, keep serving: one bad model must not take the worker down
                conn.send(Message.failed(unit, traceback.format_exc()))
                continue
            units += 1
            conn.send(Message.done(unit, result))
    finally:
        conn.close()
    return {"partition": partition, "units": units, **devices}


def barrier_task(address: tuple[str, int], secret: bytes, workload: Workload, run_url: str):
    """The function Spark runs on each of the W barrier tasks (mapPartitions over one dummy row)."""

    def run(_rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        gpus = ctx.resources().get("gpu")
        addresses = list(gpus.addresses) if gpus is not None else []
        yield serve(address, secret, workload, run_url, ctx.partitionId(), addresses, ctx.cpus())

    return run
