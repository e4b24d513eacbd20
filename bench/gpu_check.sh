#!/usr/bin/env bash
# GPU check of the attention paths (for a lent H100/H200; no network needed), one command.
#
# 1. correctness against the float32 XLA reference (outputs and q/k/v gradients): cuDNN softmax-1
#    by the zero-key construction (the GPU default) and the Pallas kernel, for softmax, softmax-1
#    and learned sinks, causal and non-causal, segment ids; 2. forward and forward+backward
#    timings (ms, TFLOP/s, speed vs cuDNN softmax) of cuDNN softmax (jax.nn), cuDNN softmax-1,
#    Pallas softmax-1 and XLA softmax-1, bf16, causal, head_dim 128, seq 1024/4096/16384;
#    3. a few train steps of a tiny bf16 model per path (same losses); 4. a short Pallas
#    block-size sweep at seq 4096. The Pallas kernel becomes the GPU default once this has
#    passed and measured it at >= 0.8x cuDNN's forward (README).
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
