"""MOP on one GPU: the DeepPostures CNN-BiLSTM, two worker processes sharing the card.

Where Keras has a GPU backend: TensorFlow's CUDA build (the Spark image), or Keras 3's JAX or
PyTorch backend (``KERAS_BACKEND``), which run the same models unchanged where TensorFlow's GPU
build cannot be installed. No Spark: the two workers are local processes running the Spark
workers' loop (mop/local_workers.py). Parts, each recorded as it finishes (a part that fails
records its error and the next one runs):

1. ``device``: backend, GPU, and whether the LSTMs run on cuDNN: Keras' fused path
   (``backend.lstm``) taken on every LSTM call, none falling back to the step-by-step loop, and on
   PyTorch the GPU kernels that one training step launched (cuDNN's RNN kernels by name).
2. ``hop_cost``: the true hop cost on the GPU (shared/reference/mop.md), from bench/hop_cost.py's
   schedule (each model 2 units on one worker, then 2 on the other): median hopped-in unit /
   median stayed unit, at the demo's unit size and at 4x it, amp 0.25 and 1.
3. ``mop``: MOP with 2 workers sharing the GPU: units per second, utilisation, hop overhead and
   true hop cost from the run's own timeline, GPU memory and load sampled by nvidia-smi.
4. ``sequential``: the same models trained one after another in one process on the same GPU
   (a fresh process, as a worker is); MOP's speed-up over it.

    KERAS_BACKEND=torch python bench/mop_gpu.py [--out DIR] [--models 4] [--epochs 3] [--sequences 2560]

Writes bench/results/mop_gpu_<backend>.json (and DIR/, with the timeline plot, when given).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

from _common import RESULTS, ROOT, train_one_after_another  # bench/ is this script's folder, first on sys.path

sys.path.insert(0, ROOT)

from cerebro_tasks.deeppostures.synthetic_workload import SyntheticCnnBilstmWorkload  # noqa: E402
from cerebro_tasks.mop.workload import ModelSpec  # noqa: E402

WORKERS = 2
LEARNING_RATES = [3e-3, 1e-3, 3e-4, 1e-4, 3e-3, 1e-3, 3e-4, 1e-4]


def specs(models: int, epochs: int, amp: float) -> list[ModelSpec]:
    # one graph (same amp and window): each worker keeps one built model and reads states into it
    return [ModelSpec(f"m{i:02d}", {"amp_factor": amp, "window_minutes": 3, "learning_rate": LEARNING_RATES[i % 8]},
                      epochs, seed=i) for i in range(models)]


def count_lstm_paths() -> dict[str, int]:
    """Counts the calls of Keras' fused LSTM paths (cuDNN on a GPU) that ran, and those that fell back
    to the step-by-step loop: ``backend.bidirectional_lstm`` (JAX and PyTorch run a Bidirectional
    LSTM as one call) and ``backend.lstm`` (one direction; TensorFlow's path)."""
    import keras.src.backend as kb

    calls: dict[str, int] = {}
    for name in ("lstm", "bidirectional_lstm"):
        fused = getattr(kb, name, None)
        if fused is None:
            continue

        def counting(*args: Any, _fused: Callable[..., Any] = fused, _name: str = name, **kwargs: Any) -> Any:
            try:
                out = _fused(*args, **kwargs)
            except NotImplementedError:
                calls[f"{_name}_fallback"] = calls.get(f"{_name}_fallback", 0) + 1
                raise
            calls[f"{_name}_fused"] = calls.get(f"{_name}_fused", 0) + 1
            return out

        # keras/src/layers/rnn/{lstm,bidirectional}.py call backend.<name> at each call (or trace)
        setattr(kb, name, counting)
    return calls


def device_part(amp: float) -> dict[str, Any]:
    import keras

    backend = keras.backend.backend()
    out: dict[str, Any] = {"backend": backend, "keras": keras.__version__}
    out["nvidia_smi"] = _smi(["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    calls = count_lstm_paths()
    workload = SyntheticCnnBilstmWorkload(sequences_per_partition=64, batch_size=16)
    spec = specs(1, 1, amp)[0]
    keras.utils.set_random_seed(0)
    model = workload.build_model(spec)
    # building the model called the layers on symbolic tensors, which PyTorch's fused path refuses
    # (falling back there is right): count the training steps' calls only
    calls.clear()
    inputs = workload.inputs(workload.load_partition("train", 0), spec, training=True, seed=0)
    model.fit(inputs.x, inputs.y, batch_size=16, epochs=1, verbose=0)  # build and warm up
    out["lstm_calls"] = dict(calls)
    if backend == "torch":
        import torch
        from torch.profiler import ProfilerActivity, profile

        out["torch"] = torch.__version__
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            try:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    model.fit(inputs.x[:16], inputs.y[:16], batch_size=16, epochs=1, verbose=0)
                    torch.cuda.synchronize()
                names = sorted({e.key for e in prof.key_averages()})
            except Exception as e:  # no CUPTI here: the call counts still say which path ran
                out["profiler_error"] = repr(e)[:500]
                names = []
            out["cuda_kernels"] = len(names)
            # cuDNN's RNN kernels by name (its convolutions' "..._cudnn" kernels do not count)
            out["rnn_kernels"] = [n for n in names if any(k in n.lower() for k in ("rnn", "lstm"))][:20]
    elif backend == "jax":
        import jax

        out["jax"] = jax.__version__
        out["devices"] = [str(d) for d in jax.devices()]
        # the compiled forward pass: cuDNN's RNN shows as an XLA custom call
        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]
        forward = jax.jit(lambda t, n, x: model.stateless_call(t, n, x)[0])
        hlo = forward.lower(trainable, frozen, inputs.x[:16]).compile().as_text()
        out["rnn_custom_calls"] = sorted({line.split('custom_call_target="')[1].split('"')[0]
                                          for line in hlo.splitlines() if 'custom_call_target="' in line})
    fused = sum(n for k, n in calls.items() if k.endswith("_fused"))
    fell_back = sum(n for k, n in calls.items() if k.endswith("_fallback"))
    seen_on_gpu = {"torch": bool(out.get("rnn_kernels")),
                   "jax": any("rnn" in c.lower() for c in out.get("rnn_custom_calls", []))}
    out["cudnn_lstm"] = bool(_has_gpu() and fused and not fell_back and seen_on_gpu.get(backend, True))
    return out


def hop_cost_part(cases: list[tuple[float, int]], folder: str) -> dict[str, Any]:
    from hop_cost import hop_schedule  # bench/hop_cost.py: the same schedule as on the CPU

    out = {}
    for amp, sequences in cases:
        params = {"amp_factor": amp, "window_minutes": 3, "learning_rate": 1e-3}
        r = hop_schedule("after", params, sequences, 1, 6, folder)
        out[f"amp {amp}, {sequences} sequences"] = r
        f = r["visits_4_on"]
        print(f"hop cost, amp {amp}, {sequences} sequences/unit: true hop cost {f['hop_cost']} (stayed unit "
              f"{f['stayed']['unit_s']} s, hopped-in {f['hopped']['unit_s']} s: state read {f['hopped']['load_s']} s,"
              f" compute {f['hopped']['compute_s']} s; stayed compute {f['stayed']['compute_s']} s)", flush=True)
    return out


def mop_part(args: argparse.Namespace, folder: str, out_dir: str | None) -> dict[str, Any]:
    from cerebro_tasks.mop.runtime import run_mop
    from cerebro_tasks.mop.timeline import plot_timeline, timeline_figures

    workload = SyntheticCnnBilstmWorkload(sequences_per_partition=args.sequences, batch_size=16)
    sampler = GpuSampler()
    sampler.start()
    try:
        result = run_mop(None, workload, specs(args.models, args.epochs, args.amp), os.path.join(folder, "mop"),
                         num_workers=WORKERS, seed=0, local_gpus=["0"] if _has_gpu() else [])
    finally:
        sampler.stop()
    figures = timeline_figures(result.records, WORKERS)
    train = [r for r in result.records if r["unit"]["kind"] == "train"]
    out = {"wall_s": result.wall_s, "units": len(result.records), "train_units": len(train),
           "units_per_s": len(result.records) / figures["makespan_s"],
           "train_sequences_per_s": sum(r.get("num_samples", 0) for r in train) / figures["makespan_s"],
           "median_train_unit_s": statistics.median(r["end"] - r["start"] for r in train),
           "timeline": figures, "workers": result.workers, "gpu": sampler.summary(),
           "final_val_loss": {m: h["val_loss"][-1] for m, h in result.histories.items()}}
    if out_dir:
        plot_timeline(result.records, os.path.join(out_dir, f"mop_gpu_{_backend()}_timeline.png"),
                      title=f"MOP, 2 workers sharing one GPU ({_backend()})")
    print(f"MOP, {WORKERS} workers on one GPU: {out['units']} units in {figures['makespan_s']:.1f} s "
          f"({out['units_per_s']:.2f} units/s), utilisation {figures['utilisation']:.2f}, true hop cost "
          f"{figures.get('hop_cost')}, GPU {out['gpu']}", flush=True)
    return out


def sequential(args: argparse.Namespace) -> dict[str, Any]:
    """The same models trained one after another in this process, on the same GPU."""
    from cerebro_tasks.mop.worker import configure_devices

    configure_devices(["0"] if _has_gpu() else [], max(1, (os.cpu_count() or 2) // WORKERS))
    workload = SyntheticCnnBilstmWorkload(sequences_per_partition=args.sequences, batch_size=16)
    return train_one_after_another(workload, specs(args.models, args.epochs, args.amp), WORKERS)


def sequential_part(args: argparse.Namespace, mop: dict[str, Any] | None) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--sequential", "--models", str(args.models), "--epochs",
           str(args.epochs), "--sequences", str(args.sequences), "--amp", str(args.amp)]
    started = time.time()
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    out["wall_s"] = time.time() - started  # with the process's start, as MOP's wall has its workers'
    if mop:
        out["mop_speedup_training"] = out["seconds"] / mop["timeline"]["makespan_s"]
        out["mop_speedup_wall"] = out["wall_s"] / mop["wall_s"]
        print(f"sequential on one GPU process: {out['seconds']:.1f} s of training ({out['wall_s']:.1f} s wall); "
              f"MOP {out['mop_speedup_training']:.2f}x ({out['mop_speedup_wall']:.2f}x wall)", flush=True)
    return out


class GpuSampler:
    """nvidia-smi every second while MOP runs: the card's memory in use and its load."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if _has_gpu():
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            line = _smi(["--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"])
            try:
                used, load = (float(v) for v in line.split(","))
            except (AttributeError, ValueError):
                continue
            self.samples.append((used, load))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        return {"samples": len(self.samples), "max_memory_used_mib": max(u for u, _ in self.samples),
                "median_utilisation_pct": statistics.median(g for _, g in self.samples)}


def _smi(args: list[str]) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def _has_gpu() -> bool:
    return _smi(["-L"]) is not None


def _backend() -> str:
    import keras

    return keras.backend.backend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=2560, help="training sequences per partition (per unit)")
    parser.add_argument("--amp", type=float, default=0.25, help="the MOP models' amp factor")
    parser.add_argument("--hop-cases", default="0.25:640,1:640,0.25:2560,1:2560",
                        help="AMP:SEQUENCES,... for the hop-cost part")
    parser.add_argument("--parts", default="device,hop_cost,mop,sequential")
    parser.add_argument("--out", help="also write the results and the timeline plot here")
    parser.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sequential:
        print(json.dumps(sequential(args)))
        return
    from cerebro_tasks.mop.worker import configure_devices

    devices = configure_devices(["0"] if _has_gpu() else [], os.cpu_count() or 1)  # this process: parts 1 and 2
    backend = _backend()
    name = f"mop_gpu_{backend}"
    figures: dict[str, Any] = {"backend": backend, "args": vars(args), "cpus": os.cpu_count(), "errors": {},
                               "driver_devices": devices}
    paths = [os.path.join(RESULTS, f"{name}.json")] + ([os.path.join(args.out, f"{name}.json")] if args.out else [])

    def record(part: str, run: Callable[[], dict[str, Any]]) -> None:
        started = time.time()
        try:
            figures[part] = run()
        except Exception:  # one part's failure must not cost the others' figures
            figures["errors"][part] = traceback.format_exc()[-3000:]
            print(f"{part} failed:\n{figures['errors'][part]}", file=sys.stderr, flush=True)
        figures.setdefault("seconds", {})[part] = round(time.time() - started, 1)
        for path in paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(figures, f, indent=1, sort_keys=True, default=str)

    parts = args.parts.split(",")
    cases = [(float(a), int(s)) for a, s in (c.split(":") for c in args.hop_cases.split(","))]
    with tempfile.TemporaryDirectory() as folder:
        if "device" in parts:
            record("device", lambda: device_part(args.amp))
            print(f"device: {json.dumps(figures.get('device'), default=str)}", flush=True)
        if "hop_cost" in parts:
            record("hop_cost", lambda: hop_cost_part(cases, folder))
        if "mop" in parts:
            record("mop", lambda: mop_part(args, folder, args.out))
        if "sequential" in parts:
            record("sequential", lambda: sequential_part(args, figures.get("mop")))
    print(f"wrote {', '.join(os.path.relpath(p, ROOT) for p in paths)}")


if __name__ == "__main__":
    main()
