"""Checkpoint I/O of a full-size training state: what a save costs the
training loop, how long until orbax has written it, and what the check of
each save (moco_jax/io/saver.py: read back and compare with the checksums)
adds.

  python -m benchmarks.checkpoint_io --config configs/moco_v2_imagenet.py    # ResNet-50, K = 65536
  python -m benchmarks.checkpoint_io --config configs/moco_v3_vit_small.py   # ViT-S/16, AdamW
  python -m benchmarks.checkpoint_io --config configs/moco_v3_vit_base.py --dir /scratch/x

One JSON line per config: the state's size, the loop's blocking share of a
save (host copy, checksums, handing the arrays to orbax), the time until
the checkpoint is committed, the read-back check, and the bytes on disk.
The state is the freshly initialised one (same shapes and bytes as any
later step); each number is the median of `--repeats` saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from moco_jax.core import optim
from moco_jax.core import state as state_lib
from moco_jax.io import workdirs
from moco_jax.io.saver import CheckpointWriter
from moco_jax.launch import cli
from moco_jax import methods


def host_state(config):
    encoder = methods.build_encoder(config)
    tx, _ = optim.make_optimizer(config, steps_per_epoch=100)
    shape = (config.crop_size, config.crop_size, 3)
    state = state_lib.create_train_state(jax.random.key(0), encoder, tx, shape, config.queue_size, config.embed_dim)
    return jax.tree.map(np.asarray, state)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def measure(config, directory: str, repeats: int) -> dict:
    state = host_state(config)
    state_mb = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)) / 2**20
    writer = CheckpointWriter(directory, max_to_keep=2)
    blocking, committed, read_back = [], [], []
    for i in range(1, repeats + 1):
        step_state = state.replace(step=np.asarray(i, np.int32))
        t0 = time.perf_counter()
        writer.save(step_state, config, num_queue_shards=1)
        t1 = time.perf_counter()
        writer.manager.wait_until_finished()
        t2 = time.perf_counter()
        failure = writer.poll(wait=True)  # the write is done: what remains is the read-back check
        t3 = time.perf_counter()
        if failure is not None:
            raise failure
        blocking.append(t1 - t0)
        committed.append(t2 - t0)
        read_back.append(t3 - t2)
    writer.finish()
    return {"state_mb": round(state_mb, 1), "blocking_s": round(statistics.median(blocking), 3),
            "committed_s": round(statistics.median(committed), 3),
            "read_back_check_s": round(statistics.median(read_back), 3),
            "disk_mb": round(folder_bytes(os.path.join(workdirs.checkpoint_dir(directory), str(repeats))) / 2**20, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="config file(s), each measured")
    parser.add_argument("--dir", default="", help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for path in args.config:
        config = cli.load_config_file(path)
        with tempfile.TemporaryDirectory(dir=args.dir or None) as directory:
            result = measure(config, directory, args.repeats)
        print(json.dumps({"config": path, "backend": jax.default_backend(), **result}), flush=True)


if __name__ == "__main__":
    main()
