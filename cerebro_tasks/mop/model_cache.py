"""The models a worker keeps warm across hops: built, compiled and traced, within a memory budget.

Rebuilding a Keras model on every hop (``load_model`` after ``clear_session``) re-traces its
train and eval functions, which costs the CNN-BiLSTM several times a unit's useful work, and
leaks: every rebuild leaves memory behind (about 15 MB per unit for a small CNN-BiLSTM, 70 MB at
the published sizes). A worker therefore builds a model once and keeps it; when the model (or
another of its graph, below) hops in, only its weights and optimizer state are read into it
(mop/checkpoint.py). The least recently used built models are dropped when their estimated
footprint exceeds the budget, and rebuilt if they are needed again.

Models that differ only in what their state carries share one built model per worker. A workload
may name a model's *graph* (``Workload.graph_key``): the hyperparameters that shape the model, its
loss and its compiled functions, leaving out those that live in its variables (a Keras 3 optimizer
keeps its learning rate in a variable, so it travels in the state). The cache is keyed by graph: a
model hopping in takes the built model of its graph, whichever model's state it held, and only
reads its own state into it; its train and eval functions are already traced. A grid over learning
rates then traces once per worker instead of once per model and worker, which at small unit sizes
is most of a search's compute (bench/early_stopping.py). Without ``graph_key`` a model's graph is
its own (its id).

The budget is ``CEREBRO_MODEL_CACHE_MB`` or the driver's ``model_cache_mb`` when set; otherwise a
quarter of the GPU's memory for a worker with a GPU (two workers may share a card, and training
needs room beyond the models), else half of this worker's share of the host's memory (its cores
over the host's cores).
"""

from __future__ import annotations

import gc
import os
import subprocess
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

CACHE_MB_ENV = "CEREBRO_MODEL_CACHE_MB"
# What a built and traced model costs beyond its variables (Keras objects, the traced graphs of its
# train and eval functions): an estimate from the growth per rebuild measured on the CNN-BiLSTM.
TRACED_OVERHEAD_BYTES = 64 << 20
HOST_SHARE = 0.5
GPU_SHARE = 0.25


@dataclass
class WarmModel:
    """A built model and what it holds: whose state at which checkpoint step, the functions traced."""

    model: Any
    step: int
    nbytes: int
    traced: set[str] = field(default_factory=set)  # unit kinds ("train", "val") already run on it
    model_id: str | None = None  # the model whose state it holds (several models may share its graph)


class ModelCache:
    """Least-recently-used built models of one worker, by graph key, within `budget_bytes`.

    A model is taken out while a unit runs on it and put back only when the unit succeeded, so a
    model whose unit failed half-way (weights half-updated) is never mistaken for a known state.
    The model being put back always stays, even alone over the budget.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"model cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[str, WarmModel] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def peek(self, key: str) -> WarmModel | None:
        """The built model of graph `key` if held, leaving it where it is in the LRU order."""
        return self._entries.get(key)

    def discard(self, key: str) -> None:
        """Forget the built model of graph `key` (its state is no longer known)."""
        self._entries.pop(key, None)

    def take(self, key: str) -> WarmModel | None:
        """Remove and return the built model of graph `key`, if this worker holds one."""
        return self._entries.pop(key, None)

    def put(self, key: str, entry: WarmModel) -> list[str]:
        """Keep `entry` as the most recently used; returns the graph keys evicted to stay in budget."""
        self._entries.pop(key, None)
        self._entries[key] = entry
        evicted = []
        while len(self._entries) > 1 and self.nbytes > self.budget_bytes:
            old, _ = self._entries.popitem(last=False)
            evicted.append(old)
        if evicted:
            self.evictions += len(evicted)
            gc.collect()  # Keras models hold reference cycles: free their memory now, not some time later
        return evicted

    def clear(self) -> None:
        self._entries.clear()
        gc.collect()


def footprint_bytes(state_bytes: int) -> int:
    """Estimated memory of one warm model whose variables (and optimizer's) take `state_bytes`."""
    return int(state_bytes) + TRACED_OVERHEAD_BYTES


def default_budget_bytes(cpus: int, gpu_addresses: list[str], setting_mb: float | None = None) -> int:
    """The cache budget of a worker with `cpus` cores and GPUs `gpu_addresses` (see module docstring)."""
    if setting_mb is None and os.environ.get(CACHE_MB_ENV):
        try:
            setting_mb = float(os.environ[CACHE_MB_ENV])
        except ValueError:
            raise ValueError(f"{CACHE_MB_ENV}={os.environ[CACHE_MB_ENV]!r}: expected megabytes, a number") from None
    if setting_mb is not None:
        if setting_mb < 0:
            raise ValueError(f"model cache budget must be >= 0 MB, got {setting_mb}")
        return int(setting_mb * (1 << 20))
    if gpu_addresses:
        gpu = _gpu_memory_bytes(gpu_addresses[0])
        if gpu:
            return int(GPU_SHARE * gpu)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = min(1.0, max(1, cpus) / max(1, os.cpu_count() or 1))
    return int(HOST_SHARE * host * share)


def _gpu_memory_bytes(address: str) -> int | None:
    """Total memory of GPU `address` as nvidia-smi reports it; None when it cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                              "-i", str(address)], capture_output=True, text=True, timeout=10, check=True).stdout
        return int(float(out.strip().splitlines()[0]) * (1 << 20))  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
