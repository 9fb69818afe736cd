#!/usr/bin/env bash
# Spark resource discovery for real NVIDIA GPUs: prints {"name":"gpu","addresses":["0","1",...]}.
#
# A GPU worker runs it at start (spark.worker.resource.gpu.discoveryScript in spark-worker.conf);
# on YARN or Kubernetes each executor runs it (spark.executor.resource.gpu.discoveryScript).
# The addresses are nvidia-smi's indices *inside this container*: with a compose device
# reservation the container sees only its GPUs, numbered from 0, which is also what
# CUDA_VISIBLE_DEVICES means there, so the address a task receives is the one it can pin.
# It fails (and with it the worker's start) when nvidia-smi is missing or fails: a GPU worker
# without GPUs should say so at once, not run the search on CPUs.
set -euo pipefail
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-discovery: nvidia-smi not found; is the NVIDIA container toolkit installed and the GPU reserved" \
       "(deploy.resources.reservations.devices) with NVIDIA_DRIVER_CAPABILITIES including utility?" >&2
  exit 1
fi
indices=$(nvidia-smi --query-gpu=index --format=csv,noheader)
out=""
for i in $indices; do
  case $i in
    *[!0-9]*) echo "gpu-discovery: unexpected nvidia-smi output: $indices" >&2; exit 1 ;;
  esac
  out="${out:+$out,}\"$i\""
done
printf '{"name":"gpu","addresses":[%s]}\n' "$out"
