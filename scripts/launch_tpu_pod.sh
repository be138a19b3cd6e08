#!/usr/bin/env bash
# MoCo pretraining on a Cloud TPU pod slice (several TPU VM hosts).
#
# Every worker runs the same command; JAX finds the other workers by itself
# (train.py calls jax.distributed.initialize() when it detects a Cloud TPU
# VM), and the pmap axis spans every TPU core of the slice. The global
# batch is split over the workers, each reading its own share of the data.
#
# The workdir must be the same shared directory on every worker (an NFS or
# Filestore mount, or a gcsfuse-mounted bucket): checkpoints are written to
# it collectively and read back by all workers when a run resumes.
#
# Usage (from your workstation):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/moco_v4_32 \
#     scripts/launch_tpu_pod.sh --config configs/default.py --config.batch_size=1024
# Extra arguments are passed to train.py unchanged.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM slice}"
: "${ZONE:?set ZONE to the zone of the slice}"
: "${WORKDIR:?set WORKDIR to a directory shared by all workers}"
REPO_DIR="${REPO_DIR:-~/moco_jax}"  # where the repository is checked out on every worker

# Quote the train.py arguments for the remote shell.
ARGS=""
if (($#)); then ARGS=$(printf ' %q' "$@"); fi

# One-time set-up of every worker (uncomment on a fresh slice):
# gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command="
#   git clone <your fork of moco_jax> $REPO_DIR && cd $REPO_DIR &&
#   pip install 'jax[tpu]==0.10.2' && pip install -r requirements.txt"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command="
  cd $REPO_DIR && python3 train.py --workdir=$WORKDIR$ARGS"
