#!/usr/bin/env bash
# One short lease of a GPU machine, spent on what only a GPU can show:
#   1. the step benchmark (benchmarks/train_step.py: R50 at 224 px and the
#      CIFAR R18, float32 and bfloat16; then R50 bfloat16 with the online
#      linear probe, for what it adds to a step), unless PHASE=cifar;
#   2. as much of the 200-epoch CIFAR-10 reproduction (configs/moco_v2_cifar10.py
#      with the demo's torchvision init) as the remaining time allows, unless
#      PHASE=bench. On one H200 all 200 epochs took 7.5 minutes (BENCHMARKS.md).
# The CIFAR run stops on SIGTERM at a step boundary and saves a checkpoint in
# $WORKDIR, so a later call on the same (still warm) machine resumes it with
# PHASE=cifar; its metrics.jsonl (kNN every 10 epochs) is copied to OUT_DIR.
#
# Usage, from the repository root of the GPU machine, with the three CIFAR-10
# mosaic files of ../shared/data/cifar10 copied to .data/cifar10 and any
# missing wheels (ml-collections) in .whl:
#   benchmarks/gpu_session.sh OUT_DIR TOTAL_SECONDS [all|bench|cifar]
# TOTAL_SECONDS bounds the whole script; the benchmark gets at most
# BENCH_SECONDS (default 270) of it.
set -uo pipefail
OUT_DIR=${1:?OUT_DIR}; TOTAL=${2:?TOTAL_SECONDS}; PHASE=${3:-all}
WORKDIR=${WORKDIR:-workdir_cifar200}
BENCH_SECONDS=${BENCH_SECONDS:-270}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 - <<'EOF'
import platform, jax, jaxlib, flax, optax, numpy, orbax.checkpoint as ocp
print("python", platform.python_version(), "jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "orbax", ocp.__version__, "numpy", numpy.__version__)
print(jax.devices())
EOF
} 2>&1 | tee "$OUT_DIR/env.txt"

if [ "$PHASE" != cifar ]; then
  timeout -k 10 "$BENCH_SECONDS" python3 -m benchmarks.train_step --json "$OUT_DIR/train_step_gpu.json" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT_DIR/train_step.log"
  timeout -k 10 60 python3 -m benchmarks.train_step --models r50_224 --dtypes bfloat16 --online_probe \
    --json "$OUT_DIR/train_step_online_probe.json" 2>&1 | tee -a "$OUT_DIR/train_step.log"
fi

# What is left, less a margin for the SIGTERM save and the copies.
LEFT=$(( TOTAL - SECONDS - 45 ))
if [ "$PHASE" != bench ] && [ "$LEFT" -gt 60 ]; then
  echo "CIFAR-10 run for ${LEFT}s in $WORKDIR"
  timeout -k 40 "$LEFT" python3 train.py --config configs/moco_v2_cifar10.py --workdir "$WORKDIR" \
    --config.model.conv_init=torchvision --config.dataset=cifar10_arrays --config.data_dir=.data/cifar10 \
    ${TRAIN_ARGS:-} 2>&1 | grep -v "^\s*$" | tee -a "$OUT_DIR/cifar.log" | grep -iv "orbax" | tail -n 40
  cp "$WORKDIR"/metrics.jsonl "$OUT_DIR"/ 2>/dev/null
  ls "$WORKDIR" > "$OUT_DIR/workdir_ls.txt" 2>&1
fi
echo "done after ${SECONDS}s"
