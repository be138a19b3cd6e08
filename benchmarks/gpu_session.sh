#!/usr/bin/env bash
# One GPU lease: installs the carried wheels, then runs benchmarks/gpu_session.py
# (its docstring lists the phases: the official MoCo v2 code against moco_jax's
# step on the same GPU, the MoCo v3 recipes with and without remat, 512 pairs
# per device, the host pipeline on all cores, then the CIFAR-10 recipe with
# what is left). Writes OUT_DIR/gpu_session.{json,md} and one log per phase.
#
# Prepare here (all git-ignored; carry .official, .gpu_data, .whl and, for the
# CIFAR phase, .data: about 60 MB with CIFAR-10, so leave .data out when the
# budget cannot reach it):
#   mkdir -p .official/moco .gpu_data
#   git -C MOCO_CLONE show 3402035:moco/builder.py > .official/moco/builder.py
#   cp -r ../shared/data/imagenette_sample .gpu_data/
#   mkdir -p .data/cifar10 && cp ../shared/data/cifar10/* .data/cifar10/      # optional
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     ml-collections==1.1.0 grain==0.2.18 array-record portpicker simplejpeg==1.9.0   # what the GPU image lacks
#
# Then, on the GPU machine, from the repository root:
#   benchmarks/gpu_session.sh OUT_DIR [TOTAL_SECONDS=480] [PHASES]
set -uo pipefail
OUT_DIR=${1:?OUT_DIR}; TOTAL=${2:-480}; PHASES=${3:-}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec python3 -m benchmarks.gpu_session --out "$OUT_DIR" --budget "$TOTAL" ${PHASES:+--phases "$PHASES"}
