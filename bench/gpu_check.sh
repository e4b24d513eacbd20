#!/usr/bin/env bash
# GPU check of the Pallas softmax-1 flash kernel (for a lent H200; no network needed).
#
# 1. correctness of the Pallas kernel (bf16 and f32, forward and q/k/v gradients) against the
#    float32 XLA reference; 2. forward and forward+backward timings (TFLOP/s, speed vs cuDNN) of
#    the Pallas softmax-1 kernel, the same kernel with softmax, XLA softmax-1 and
#    jax.nn.dot_product_attention(implementation="cudnn"), bf16, causal, head_dim 128,
#    seq 1024/4096/16384; 3. a short block-size sweep at seq 4096.
# Uses the preinstalled jax/flax/optax only (installs nothing). Budget: under 8 minutes.
#
# Usage: bash bench/gpu_check.sh [--cpu-smoke]   (--cpu-smoke: tiny shapes on CPU, interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if [[ "${1:-}" == "--cpu-smoke" ]]; then
  JAX_PLATFORMS=cpu python bench/attention.py --mode gpu --cpu-smoke
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"
# Correctness first; a failure is reported, the table still printed, and the exit is non-zero.
timeout 420 python bench/attention.py --mode gpu --tune --reps 20
