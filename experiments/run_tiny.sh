#!/usr/bin/env bash
# Regenerates experiments/results/tiny_grid and experiments/results/tiny_long, 3 seeds per cell.
#
#   bash experiments/run_tiny.sh [WORKDIR]        # default runs/tiny; about 70 min on 2 CPU cores
#
# tiny_grid: softmax | softmax-1 x AdamW | OrthoAdam at 300 steps, LayerNorm in every cell, plus
# the paper's pairing (softmax-1 + OrthoAdam + scalar-gain LayerNorm: the norm changed alone).
# tiny_long: the same 2x2 grid at 1000 steps. Seeds change initialisation, data order and
# OrthoAdam's rotations (seed and optimizer.seed). Finished runs are kept: rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-runs/tiny}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$work/.jax_cache}"
mkdir -p "$work"

# train NAME VARIANT SEED [FLAGS...]: one run in $work/NAME-sSEED, skipped once finished.
train() {
  local name="$1" variant="$2" seed="$3"
  shift 3
  local dir="$work/$name-s$seed"
  [[ -f "$dir/DONE" ]] && return 0
  echo "$(date +%T) $dir"
  softmax-one train --config="experiments/configs/tiny.py:$variant" --workdir="$dir" \
    --config.seed="$seed" --config.optimizer.seed="$seed" --config.progress_bar=False "$@" \
    > "$dir.log" 2>&1
  touch "$dir/DONE"
}

grid=(softmax,adamw softmax,orthoadam softmax1,adamw softmax1,orthoadam)
long_flags=(--config.num_train_steps=1000 --config.eval_every_steps=500
            --config.outlier_every_steps=500 --config.checkpoint.every_steps=500)
for seed in 0 1 2; do
  for v in "${grid[@]}"; do train "tiny-${v/,/-}" "$v,layernorm" "$seed"; done
  train tiny-softmax1-orthoadam-scalar_layernorm softmax1,orthoadam,scalar_layernorm "$seed"
done
for seed in 0 1 2; do
  for v in "${grid[@]}"; do train "long-${v/,/-}" "$v,layernorm" "$seed" "${long_flags[@]}"; done
done

softmax-one compare "$work"/tiny-*-s? --out=experiments/results/tiny_grid
softmax-one compare "$work"/long-*-s? --out=experiments/results/tiny_long
