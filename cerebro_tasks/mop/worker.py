"""The MOP worker: a long-lived Spark barrier task that owns one data partition and runs units.

It connects back to the driver over an authenticated channel, says which partition it owns, and
then runs whatever unit the driver pushes: bring the model to the unit's checkpoint (nothing to do
when it stayed here; only its weights and optimizer state when this worker built it, or another
model of the same graph, before; a full build otherwise, see mop/model_cache.py), train one
sub-epoch or evaluate, write the next checkpoint atomically, report the unit's parts of time. Data
is read once per worker and reused by every model that hops in.

Writes behind: the state a hop reads is written before the unit reports (the driver accepts a unit
only once its successor can read it). The whole model an epoch's last train unit leaves
(``.keras``, read by results and the export, never by a unit) costs several times more to write;
the worker keeps the state in memory and writes the ``.keras`` when it would otherwise wait for its
next unit (lockstep's holds, models it waits for), or before a unit when too many wait, and tells
the driver, which publishes it (mop/runtime.py); one the driver no longer wants by then (the model
has moved on, and it is neither its final nor its best epoch) is dropped unwritten. A worker lost
first loses nothing: the driver has another write it from the state, which it keeps until then.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from typing import Any, Iterable, Iterator

import numpy as np

from cerebro_tasks.mop.checkpoint import (decode_into, encode_state, load_state, save_checkpoint, save_state,
                                         state_bytes, state_variables)
from cerebro_tasks.mop.control import Message
from cerebro_tasks.mop.model_cache import ModelCache, WarmModel, default_budget_bytes, footprint_bytes, rss_bytes
from cerebro_tasks.mop.scheduler import Unit
from cerebro_tasks.mop.workload import ModelSpec, UnitInputs, Workload
from cerebro_tasks.storage.store import Store


def configure_devices(gpu_addresses: list[str], cpus: int) -> dict[str, Any]:
    """Pin Keras' backend to this task's GPU(s), or limit its threads to the task's cores (TensorFlow
    and PyTorch; XLA on CPU sizes its own thread pool).

    Must run before the backend initialises its devices: CUDA_VISIBLE_DEVICES is read once. Each
    backend is kept from reserving the whole card (TensorFlow's memory growth, JAX's preallocation
    off; PyTorch's caching allocator grows as it goes), so workers can share one GPU. TensorFlow is
    the project's backend; JAX and PyTorch are Keras 3's others (``KERAS_BACKEND``), which run the
    same models on machines where TensorFlow's GPU build cannot be installed.
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
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # read when JAX starts its GPU client
    import keras

    backend = keras.backend.backend()
    configure = {"tensorflow": _configure_tensorflow, "jax": _configure_jax, "torch": _configure_torch}.get(backend)
    gpus = configure(cpus) if configure else []
    return {
        "gpu_addresses": list(gpu_addresses),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "backend": backend,
        "backend_gpus": gpus,
        "cpus": cpus,
    }


def _configure_tensorflow(cpus: int) -> list[str]:
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
    return [g.name for g in gpus]


def _configure_jax(cpus: int) -> list[str]:
    import jax

    # no thread limit on CPU: XLA sizes its CPU thread pool itself, with no setting once imported
    return [str(d) for d in jax.devices() if d.platform == "gpu"]


def _configure_torch(cpus: int) -> list[str]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if not gpus:
        torch.set_num_threads(max(1, cpus))
    return gpus


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


def make_lazy_variables(model: Any, inputs: UnitInputs) -> None:
    """Make now the variables Keras makes inside a model's first traced step on TensorFlow: its
    optimizer's, and those of metrics compiled by name ("accuracy"). Made inside the trace, they
    make TensorFlow trace the whole step a second time (3 of the CNN-BiLSTM's 7 s of first trace).
    Keras itself builds them ahead under a distribution strategy (``_symbolic_build``, from the
    shapes of one batch); the values are the same zeros either way."""
    import keras

    build = getattr(model, "_symbolic_build", None)  # Keras 3's own; absent elsewhere
    if build is not None and inputs.num_samples and isinstance(inputs.x, (np.ndarray, list, tuple, dict)):
        def spec(a: Any) -> Any:
            # the batch dimension unknown, as the traced step sees it: Keras picks a metric or loss
            # given by name ("accuracy") from the shapes, and a batch of 1 could change its pick
            return None if a is None else keras.KerasTensor((None, *np.shape(a)[1:]), np.asarray(a[:1]).dtype.name)

        try:
            build(data_batch=tuple(keras.tree.map_structure(spec, part)
                                   for part in (inputs.x, inputs.y, inputs.sample_weight)))
        except Exception as e:  # a model Keras cannot build from shapes still builds in its trace
            logging.getLogger("cerebro_tasks.mop").debug("variables left to the first trace: %s", e)
    state_variables(model)  # the optimizer's, whatever the above could do


class PartitionError(RuntimeError):
    """This worker's data cannot be read: no model can train here, so the run stops."""


@dataclass(frozen=True)
class WorkerSettings:
    """What the driver tells every worker beyond its partition: the budget of its warm models in
    megabytes (None: derived, mop/model_cache.py) and whether whole models are written behind."""

    model_cache_mb: float | None = None
    write_behind: bool = True


# Whole models waiting to be written behind (module docstring): at most this many, each holding its
# state in memory, and together at most this share of the warm models' budget (mop/model_cache.py);
# a unit that finds the limit reached writes the oldest first. The longer they wait, the more of them
# the driver drops unwritten: only the newest, the final and (with a selection metric) the best
# epoch's whole model are kept.
MAX_BEHIND = 4
BEHIND_BUDGET_SHARE = 0.25
# After a unit, how long a worker waits for its next one before it starts writing a whole model
# behind: a unit the driver sends straight back (its round trip is a few ms) then runs first, and the
# write takes a moment the worker would have idled (lockstep's holds, a model it waits for).
BEHIND_WAIT_S = 0.05


@dataclass
class WholeBehind:
    """An epoch-end model whose whole checkpoint (``.keras``) is still to be written: from the state
    its unit ended with (``state``), through the built model it ran on (``model``); or, when the
    driver asks again after its first writer was lost, from the committed state file (both None)."""

    spec: ModelSpec
    step: int
    attempt: str | None
    state: bytes | None = None
    # held so that writing never builds a model: a build would draw from the random generators the
    # next model built here is seeded from, at a moment that depends on timing (lockstep's promise)
    model: Any = None


class UnitRunner:
    """Runs units on one partition, keeping the models it built warm across hops, one per graph
    (mop/model_cache.py)."""

    def __init__(self, workload: Workload, run_store: Store, partition: int,
                 cache_budget_bytes: int | None = None, num_partitions: int | None = None,
                 write_behind: bool = False) -> None:
        """``write_behind``: an epoch's whole model waits in ``behind`` for :meth:`write_behind` (the
        worker loop's); otherwise the unit writes it before it returns."""
        self.workload = workload
        self.store = run_store
        self.partition = partition
        # P: a train unit that ends an epoch also writes the whole model (None: after every unit)
        self.num_partitions = num_partitions
        self._data: dict[str, Any] = {}
        if cache_budget_bytes is None:
            cache_budget_bytes = default_budget_bytes(os.cpu_count() or 1, [])
        self.cache = ModelCache(cache_budget_bytes)
        self.write_behind_on = write_behind
        self.behind: deque[WholeBehind] = deque()
        self.behind_budget_bytes = int(BEHIND_BUDGET_SHARE * cache_budget_bytes)

    def data(self, kind: str) -> Any:
        if kind not in self._data:
            try:
                self._data[kind] = self.workload.load_partition(kind, self.partition)
            except Exception as e:
                raise PartitionError(f"{kind} partition {self.partition} could not be read: "
                                     f"{type(e).__name__}: {e}") from e
        return self._data[kind]

    def graph_key(self, spec: ModelSpec) -> str:
        """The cache key of `spec`'s built model: its workload's graph key, else its own id."""
        key = getattr(self.workload, "graph_key", None)
        return spec.model_id if key is None else f"graph:{key(spec)}"

    def _model_at(self, spec: ModelSpec, step: int, key: str) -> tuple[WarmModel, str, float]:
        """The model at checkpoint `step` and how it came: "stayed" (already at that state here),
        "warm" (a built model of its graph was here: only its state was read into it), "new" (its
        first unit, on a graph built here: made from its seed, its initial state read into the
        traced model) or "cold" (built here now, from its seed, then its state read). Also the
        seconds spent building; the rest is reading state. `key`: its graph key (cache entry)."""
        import keras

        # taken out of the cache: until the unit succeeds, this worker holds nothing trusted of it
        warm = self.cache.take(key)
        if warm is not None and warm.model_id == spec.model_id and warm.step == step:
            return warm, "stayed", 0.0
        started = time.time()
        if step == 0:
            # Initial weights come from the model's seed. Seeding TensorFlow clears its kernel cache,
            # which makes every warm model on this worker pay a re-instantiation of its functions on
            # its next unit: only a model's very first unit seeds.
            keras.utils.set_random_seed(spec.seed)
            model = self.workload.build_model(spec)
            built = time.time() - started
            if warm is None or warm.model_id == spec.model_id:  # (its own model again: a re-run from scratch)
                return WarmModel(model, 0, 0, model_id=spec.model_id), "cold", built
            # another model of its graph is built and traced here: it takes this one's initial state
            # (weights, optimizer slots, learning rate); the fresh build, never traced, is dropped
            decode_into(warm.model, encode_state(model), f"the initial state of {spec.model_id}")
            del model
            warm.model_id, warm.step = spec.model_id, 0
            return warm, "new", built
        if warm is None:
            warm = WarmModel(self.workload.build_model(spec), step, 0)
            arrival, built = "cold", time.time() - started
        else:
            arrival, built = "warm", 0.0
        load_state(self.store, warm.model, spec.model_id, step)
        warm.model_id, warm.step = spec.model_id, step
        return warm, arrival, built

    def run(self, unit: Unit, spec: ModelSpec, attempt: str | None = None, since: float | None = None) -> dict[str, Any]:
        """Run one unit. A train unit writes its checkpoint under ``attempt`` for the driver to
        accept (storage/layout.py); without one (a worker run by hand, a bench) it writes the plain
        name directly. ``since``: when the unit's message came, if whole models were written behind
        earlier units before it could start (their time is the unit's, as ``behind_s``)."""
        start = time.time() if since is None else since
        begun = time.time()
        data = self.data(unit.kind)
        read = time.time()
        key = self.graph_key(spec)
        warm, arrival, build_s = self._model_at(spec, unit.step, key)
        loaded = time.time()
        model = warm.model
        training = unit.kind == "train"
        traced = unit.kind in warm.traced
        # a different, reproducible shuffle for every sub-epoch of every model
        inputs = self.workload.inputs(data, spec, training=training, seed=spec.seed * 100_003 + unit.step)
        if not traced:
            make_lazy_variables(model, inputs)
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
        whole = behind = None
        if training:
            state = save_state(self.store, model, unit.model_id, unit.step + 1, attempt)
            if self.num_partitions is None or (unit.step + 1) % self.num_partitions == 0:
                if self.write_behind_on:
                    behind = WholeBehind(spec, unit.step + 1, attempt, state, model)
                    whole = "behind"
                else:
                    save_checkpoint(self.store, model, unit.model_id, unit.step + 1, attempt)
                    whole = "written"
            warm.step = unit.step + 1
        if inputs.num_samples:
            warm.traced.add(unit.kind)
        warm.nbytes = footprint_bytes(state_bytes(model))
        evicted = self.cache.put(key, warm)
        if behind is not None:  # only now: a unit that failed before here leaves nothing to write
            self.behind.append(behind)
        end = time.time()
        return {
            "metrics": metrics,
            "metric_state": states,
            "num_samples": int(inputs.num_samples),
            "start": start,
            "end": end,
            # the parts of the unit's time: whole models written behind earlier units before it
            # could start, data read (first unit of a kind only), model build, state read,
            # training or evaluation, checkpoint write
            "behind_s": begun - start,
            "data_s": read - begun,
            "build_s": build_s,
            "load_s": loaded - read - build_s,
            "compute_s": computed - loaded,
            "save_s": end - computed,
            "whole": whole,  # its epoch's whole model: "written" with it, "behind" (later), None
            "arrival": arrival,
            "traced": traced,  # its train (or eval) function was already traced on this model
            "reused_model": arrival == "stayed",
            "cached_models": len(self.cache),
            "evicted": evicted,
            "rss_mb": rss_bytes() / (1 << 20),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "attempt": attempt,
        }

    def behind_full(self) -> bool:
        """Whether the whole models waiting with their state in memory are at their limit (MAX_BEHIND,
        or their share of memory); those the driver asked for again hold nothing and do not count."""
        held = [len(job.state) for job in self.behind if job.state is not None]
        return len(held) >= MAX_BEHIND or (len(held) > 0 and sum(held) > self.behind_budget_bytes)

    def drop_behind(self, model_id: str, step: int, attempt: str | None) -> None:
        """Forget a whole model waiting to be written: nothing will read it."""
        self.behind = deque(job for job in self.behind
                            if (job.spec.model_id, job.step, job.attempt) != (model_id, step, attempt))

    def write_behind(self) -> tuple[WholeBehind, float]:
        """Write the oldest whole model waiting (``behind``); returns it and the seconds it took.

        It goes through the built model its unit ran on (asked for again: the one of its graph held
        here, else one built for it and dropped after), without moving the warm models' LRU order.
        The state is read into that model unless it holds it already (the model stayed for its
        validation); if it is the warm model of its graph, the cache then says whose state it holds,
        or, should the read fail half-way, forgets it (as after a failed unit)."""
        job = self.behind.popleft()
        started = time.time()
        spec = job.spec
        key = self.graph_key(spec)
        warm = self.cache.peek(key)
        model = job.model if job.model is not None else (warm.model if warm is not None else None)
        if model is None:  # asked for again, and no model of its graph here: one for this write only
            model = self.workload.build_model(spec)
        cached = warm is not None and warm.model is model
        if not (cached and (warm.model_id, warm.step) == (spec.model_id, job.step)):
            try:
                if job.state is None:
                    load_state(self.store, model, spec.model_id, job.step)
                else:
                    decode_into(model, job.state, f"the state of {spec.model_id} after step {job.step}")
            except BaseException:
                if cached:
                    self.cache.discard(key)
                raise
            if cached:
                warm.model_id, warm.step = spec.model_id, job.step
        save_checkpoint(self.store, model, spec.model_id, job.step, job.attempt)
        return job, time.time() - started


def _write_behind(runner: UnitRunner, conn: Connection) -> float:
    """Write the oldest whole model waiting and tell the driver how it went; returns the seconds."""
    job = runner.behind[0]
    started = time.time()
    try:
        job, seconds = runner.write_behind()
        msg = Message.saved(job.spec.model_id, job.step, job.attempt, seconds)
    except Exception:  # the driver has it written elsewhere: the state it needs is committed
        msg = Message.saved(job.spec.model_id, job.step, job.attempt, 0.0, error=traceback.format_exc())
    conn.send(msg)
    return time.time() - started


def serve(address: tuple[str, int], secret: bytes, workload: Workload, run_url: str, partition: int,
          gpu_addresses: list[str], cpus: int, settings: WorkerSettings = WorkerSettings(),
          num_partitions: int | None = None) -> dict[str, Any]:
    """Connect to the driver and run pushed units until told to stop. Returns this worker's summary."""
    devices = configure_devices(gpu_addresses, cpus)
    budget = default_budget_bytes(cpus, gpu_addresses, settings.model_cache_mb)
    devices["model_cache_mb"] = round(budget / (1 << 20), 1)
    runner = UnitRunner(workload, Store(run_url), partition, budget, num_partitions, settings.write_behind)
    conn = Client(address, authkey=secret)
    conn.send(Message.hello(partition, {"host": socket.gethostname(), "pid": os.getpid(), **devices}))
    units = 0
    delayed = 0.0  # seconds of a write behind that the message now waiting may have waited for
    try:
        while True:
            try:
                if runner.behind and not conn.poll(BEHIND_WAIT_S):  # nothing to run: write a whole model behind
                    seconds = _write_behind(runner, conn)
                    if conn.poll(0):  # the next message came during the write: it waited, at most this long
                        delayed += seconds
                    continue
                msg = conn.recv()
            except EOFError:  # the driver closed the channel (it stopped, or failed): nothing more will come
                break
            if msg.kind == "stop":  # sent once every wanted whole model is in place: the rest are not
                break
            if msg.kind != "unit":
                delayed = 0.0  # what waited was not a unit
            if msg.kind == "whole":
                p = msg.payload
                runner.behind.append(WholeBehind(p["spec"], p["step"], p["attempt"]))
                continue
            if msg.kind == "drop":
                runner.drop_behind(**msg.payload)
                continue
            unit, spec = msg.payload["unit"], msg.payload["spec"]
            since, delayed = time.time() - delayed, 0.0
            while runner.behind_full():  # no idle moment came: write the oldest now
                _write_behind(runner, conn)
            try:
                result = runner.run(unit, spec, msg.payload["attempt"], since=since)
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
        runner.cache.clear()  # a reused Python worker must not carry this run's models into the next
    return {"partition": partition, "units": units, "evictions": runner.cache.evictions, **devices}


def barrier_task(address: tuple[str, int], secret: bytes, workload: Workload, run_url: str,
                 settings: WorkerSettings = WorkerSettings()):
    """The function Spark runs on each of the W barrier tasks (mapPartitions over one dummy row)."""

    def run(_rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        gpus = ctx.resources().get("gpu")
        addresses = list(gpus.addresses) if gpus is not None else []
        yield serve(address, secret, workload, run_url, ctx.partitionId(), addresses, ctx.cpus(), settings,
                    len(ctx.getTaskInfos()))

    return run
