#!/usr/bin/env bash
# The GPU check of issue 13 as one prepared run: bench/mop_gpu.py on Keras' PyTorch backend, then
# on its JAX backend, each under a time limit (TORCH_PARTS / JAX_PARTS choose parts; default all).
#
# For a GPU machine with no package index and no TensorFlow: PyTorch or JAX come with the machine,
# Keras and its two missing pure dependencies travel as wheels in .whl/ (fetched beforehand with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... keras==3.15.1 namex optree`).
# Results go to $OUT (default bench/results/gpu) and bench/results/.
#
#     bash bench/gpu_check.sh     (PYTHON, WHEELS, TORCH_LIMIT_S, JAX_LIMIT_S, MOP_GPU_ARGS: see below)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi -L; "$PY" --version; KERAS_BACKEND=torch "$PY" -c "import keras, numpy; print('keras', keras.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/env.log"
KERAS_BACKEND=torch timeout "${TORCH_LIMIT_S:-330}" "$PY" bench/mop_gpu.py --out "$OUT" --parts "${TORCH_PARTS:-device,hop_cost,mop,sequential}" ${MOP_GPU_ARGS:-} 2>&1 \
  | tee "$OUT/torch.log" | tail -n 25
KERAS_BACKEND=jax timeout "${JAX_LIMIT_S:-150}" "$PY" bench/mop_gpu.py --out "$OUT" --parts "${JAX_PARTS:-device,hop_cost,mop,sequential}" ${MOP_GPU_ARGS:-} 2>&1 \
  | tee "$OUT/jax.log" | tail -n 15
