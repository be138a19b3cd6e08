#!/usr/bin/env bash
# MoCo pretraining on one host with several GPUs.
#
# One process drives all local GPUs: the pmap axis spans them, no
# distributed set-up is needed. Choose the GPUs with CUDA_VISIBLE_DEVICES;
# the global batch (config.batch_size) is split evenly over them, so it
# must be a multiple of their number.
#
# Usage:
#   CUDA_VISIBLE_DEVICES=0,1,2,3 WORKDIR=/tmp/moco_4gpu \
#     scripts/launch_multi_gpu_host.sh --config configs/default.py --config.batch_size=256
# Extra arguments are passed to train.py unchanged.
#
# (One process per GPU works too, e.g. to mirror a multi-node layout on one
# machine: start N copies of train.py with --coordinator_address=localhost:PORT
# --num_processes=N --process_id=i --local_device_ids=i; see the SLURM script
# for the multi-node case.)
set -euo pipefail

cd "$(dirname "$0")/.."
WORKDIR="${WORKDIR:-/tmp/moco_multi_gpu}"
# Let XLA allocate GPU memory on demand up to 90% instead of grabbing 75% at start-up.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python3 train.py --workdir="$WORKDIR" "$@"
