"""Per-device memory of the MoCo v3 recipes' training step, with and without
rematerialisation (`model.remat`), from XLA's memory analysis of the compiled
step: nothing is run, so this works on a CPU for the real sizes.

  python -m benchmarks.remat_memory                     # ViT-B/16 and ResNet-50 v3, bf16, ~10 min on 2 cores
  python -m benchmarks.remat_memory --recipes vit_small --pairs 2,8 --json /tmp/remat.json

For each recipe (configs/moco_v3_vit_base.py, moco_v3_r50.py, ...) the step
is compiled for one device at two per-device batches (`--pairs`), from
abstract inputs (the state's shapes, host-cut 224 px crops), and its bytes
(arguments + outputs - donated + temporaries, as benchmarks/train_step.py
counts them) are fitted as a + b x pairs and projected to `--target` pairs
per device (512: the recipes' batch of 4,096 on one 8-GPU host). The CPU
backend's buffer assignment (with its memory-minimising scheduler, below)
is not a GPU's: take the projection as an estimate, to be checked on the
GPU itself (benchmarks/train_step.py's peak memory column).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path

# XLA's CPU compiler schedules for concurrency by default, computing the
# rematerialised forwards early and so keeping what remat would free (ViT-S,
# 8 images: 1,150 MiB of temporaries with or without remat); its memory-
# minimising scheduler, like the GPU's memory-aware one, shows what remat saves
# (858 -> 458 MiB). Set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.train_step import compiled_memory_bytes  # noqa: E402
from moco_jax import methods  # noqa: E402
from moco_jax.core import optim, sharding  # noqa: E402
from moco_jax.core import state as state_lib  # noqa: E402
from moco_jax.training import trainer  # noqa: E402

RECIPES = {"vit_base": "configs.moco_v3_vit_base", "r50": "configs.moco_v3_r50",
           "vit_small": "configs.moco_v3_vit_small"}


def recipe_config(recipe: str, remat: str, pairs: int, dtype: str):
    config = importlib.import_module(RECIPES[recipe]).get_config()
    config.model.remat, config.model.dtype, config.batch_size = remat, dtype, pairs
    return config


def step_bytes(config) -> tuple[float, float]:
    """(bytes per device of the compiled step on one device, compile seconds)."""
    encoder = methods.build_encoder(config, axis_name=sharding.AXIS)
    tx, _ = optim.make_optimizer(config, steps_per_epoch=1000)
    size = config.crop_size
    state = jax.eval_shape(lambda: state_lib.create_train_state(
        jax.random.key(0), encoder, tx, (size, size, 3), methods.get(config).queue_size(config), config.embed_dim))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype), state)
    crops = jax.ShapeDtypeStruct((1, config.batch_size, 2, size, size, 3), jnp.uint8)
    start = time.perf_counter()
    compiled = trainer.make_train_step(config, host_cropped=True, total_steps=1000).lower(state, crops).compile()
    return compiled_memory_bytes(compiled), time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="vit_base,r50", help=f"comma-separated, of {sorted(RECIPES)}")
    parser.add_argument("--pairs", default="4,16", help="two per-device batches to fit the line through")
    parser.add_argument("--target", type=int, default=512, help="pairs per device to project to")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    small, large = (int(p) for p in args.pairs.split(","))
    rows = []
    for recipe in args.recipes.split(","):
        for remat in ("none", "blocks"):
            (a_bytes, a_s), (b_bytes, b_s) = (step_bytes(recipe_config(recipe, remat, p, args.dtype))
                                             for p in (small, large))
            per_pair = (b_bytes - a_bytes) / (large - small)
            rows.append(dict(recipe=recipe, remat=remat, dtype=args.dtype, pairs=[small, large],
                             gib=[a_bytes / 2**30, b_bytes / 2**30], gib_per_pair=per_pair / 2**30,
                             projected_gib=(a_bytes + per_pair * (args.target - small)) / 2**30,
                             target_pairs=args.target, compile_s=[a_s, b_s]))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
