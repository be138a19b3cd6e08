"""Input-pipeline throughput: host side, on-device augmentation, and how the
augmentation compares with the training step it feeds.

  python -m benchmarks.input_pipeline                    # everything, ~4 min on 2 cores
  python -m benchmarks.input_pipeline --skip_train_step  # host + augmentation only
  python -m benchmarks.input_pipeline --skip_train_step --grain_workers=0,4,8,15 --tf_threads=15  # a 16-core host

(a) Host: images/second delivered by `trainer.pretrain_batches` (what the
    trainer iterates), after a warm-up:
    * cifar10_arrays: the real CIFAR-10 arrays (../shared/data/cifar10), whole
      32px images gathered per step (the device crops them);
    * image_folder: the 224px JPEGs of ../shared/data/imagenette_sample/train,
      decoded, two random-resized-crop boxes per image (the default
      resize_on_device: the decoded image in a slot, the boxes cut and resized
      on the device; tf.data: uint8 (2, 224, 224, 3) host crops):
      - grain (`data_loader=grain`): Pillow in W worker processes (1 thread
        each), or in T threads of this process (W = 0);
      - tf.data (`data_loader=tf`, if TensorFlow is installed): T threads,
        `decode_and_crop_jpeg` of each window.
    cpu_s_per_1k_images is the whole machine's busy CPU time (/proc/stat:
    worker processes included) per 1,000 images, so on an otherwise idle
    machine a host with c cores delivers at most about c x 1000 / it images/s.
(b) Device: the rest of the augmentation (`augment.make_views_fn`, jitted) on
    the default JAX device: CIFAR recipe from whole 32px images (crop on the
    device) and MoCo v2 from host crops at 224px.
(c) The MoCo training step with that augmentation inside (ResNet-18, CIFAR
    stem at 32px / ImageNet stem at 224px), to state the augmentation's share.

The host side at ImageNet size (CPU-ms per 500 x 375 JPEG and its parts,
images/s per worker count, worker memory, listing and start-up on 130,000
files, and the projection to 16- to 112-core hosts) is
`python -m benchmarks.imagenet_host` (BENCHMARKS.md, "ImageNet-scale host
pipeline").
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from configs import default
from moco_jax import data
from moco_jax.core import augment, optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.training import trainer
from moco_jax import methods
from moco_jax.methods import moco_v2

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rate(batches, warmup: int, steps: int) -> dict:
    """Throughput of `steps` batches after `warmup`.

    images_per_s is wall-clock; images_per_cpu_s divides by the CPU time of
    this process (all its threads, not grain's worker processes), which stays
    meaningful when other jobs share the machine: on an idle machine with c
    cores an in-process pipeline can reach at most about c x images_per_cpu_s.
    """
    for _ in range(warmup):
        next(batches)
    wall, cpu = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(steps):
        b = next(batches)
        first = b[0] if isinstance(b, tuple) else b  # (slots, views): resized on the device
        images += first.shape[0] * first.shape[1]
        shape = [list(x.shape) for x in b] if isinstance(b, tuple) else list(b.shape)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(images_per_s=images / wall, views_per_s=2 * images / wall,
                images_per_cpu_s=images / cpu, batch_shape=shape,
                load_average_1min=os.getloadavg()[0])


def host_cifar(args) -> dict:
    config = default.get_config()
    config.update(dict(dataset="cifar10_arrays", data_dir=str(args.cifar_dir), image_size=32,
                       crop_size=32, batch_size=256))
    start = time.perf_counter()
    batches = trainer.pretrain_batches(data.open_source(config), config, start_step=0)
    load_s = time.perf_counter() - start
    return dict(source="cifar10_arrays (32px, whole images)", load_s=load_s,
                **_rate(batches, 5, args.cifar_steps))


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def host_imagenette(args, loader: str, workers: int, threads: int) -> dict:
    config = default.get_config()
    config.update(dict(dataset="image_folder", data_dir=str(args.imagenette_dir),
                       train_split="train", crop_size=224, crop_scale=(0.2, 1.0),
                       batch_size=64, data_loader=loader, input_workers=workers, input_threads=threads))
    batches = trainer.pretrain_batches(data.open_source(config), config, start_step=0)
    for _ in range(3):  # warm-up: worker start-up, first decodes
        next(batches)
    start_busy = _busy_cpu_seconds()
    row = _rate(batches, 0, args.jpeg_steps)
    images = args.jpeg_steps * 64
    row["cpu_s_per_1k_images"] = 1000 * (_busy_cpu_seconds() - start_busy) / images
    batches.close()
    what = (f"tf.data, {threads} threads" if loader == "tf" else
            f"grain, {workers} workers x {threads} thread" if workers else f"grain, no workers, {threads} threads")
    return dict(source=f"image_folder imagenette 224px JPEG, {what}", loader=loader, workers=workers,
                threads=threads, **row)


def host_imagenette_rows(args) -> list[dict]:
    """Every loader configuration of --grain_workers / --tf_threads."""
    rows = []
    for workers in args.grain_workers:
        rows.append(host_imagenette(args, "grain", workers, 1 if workers else os.cpu_count()))
        print(json.dumps(rows[-1]), flush=True)
    try:
        import tensorflow  # noqa: F401 - only to know whether the tf.data rows can run
    except ImportError:
        print("skipping the tf.data rows: TensorFlow is not installed")
        return rows
    for threads in args.tf_threads:
        rows.append(host_imagenette(args, "tf", -1, threads))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _time(fn, *args, reps: int) -> float:
    """Seconds per call of a jitted fn (compiled and warmed first)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def _cases(args):
    """(name, recipe, host_cropped, batch (1, B, ...) uint8, model depth, stem)."""
    rng = np.random.default_rng(0)
    cifar = rng.integers(0, 256, (1, args.cifar_batch, 32, 32, 3), np.uint8)
    crops = rng.integers(0, 256, (1, args.jpeg_batch, 2, 224, 224, 3), np.uint8)
    return [("cifar recipe, 32px whole images", augment.recipe_by_name("cifar", 32), False,
             cifar, "cifar"),
            ("moco_v2 recipe, 224px host crops", augment.recipe_by_name("moco_v2", 224), True,
             crops, "imagenet")]


def device_augmentation(args) -> list[dict]:
    rows = []
    for name, recipe, host_cropped, batch, _ in _cases(args):
        views = jax.jit(augment.make_views_fn(recipe, host_cropped))
        sec = _time(views, jax.random.key(0), batch[0], reps=args.aug_reps)
        rows.append(dict(case=name, batch=batch.shape[1], ms_per_batch=1000 * sec,
                         images_per_s=batch.shape[1] / sec))
    return rows


def train_step(args) -> list[dict]:
    """ResNet-18 MoCo v2 steps (the trainer's step, views from make_views_fn)."""
    rows = []
    for name, recipe, host_cropped, batch, stem in _cases(args):
        config = default.get_config()
        config.model.depth, config.model.width, config.model.stem = 18, 64, stem
        config.batch_size = batch.shape[1]
        config.queue_size = 16 * batch.shape[1]
        config.crop_size = recipe.crop_size
        config.bn_splits = 8 if batch.shape[1] % 8 == 0 else 1
        encoder = methods.build_encoder(config, axis_name=sharding.AXIS)
        tx, _ = optim.make_optimizer(config, steps_per_epoch=100)
        state = state_lib.create_train_state(jax.random.key(0), encoder, tx,
                                             (recipe.crop_size, recipe.crop_size, 3),
                                             config.queue_size, config.embed_dim)
        hp = moco_v2.MoCoHParams(temperature=config.temperature, ema_momentum=config.momentum,
                              shuffle_bn=config.shuffle_bn, symmetric=config.symmetric_loss,
                              axis_name=sharding.AXIS)
        step = jax.pmap(functools.partial(moco_v2.train_step, hp=hp,
                                          views=augment.make_views_fn(recipe, host_cropped)),
                        axis_name=sharding.AXIS, donate_argnums=(0,))
        p_state = state_lib.to_devices(state, jax.local_devices()[:1])
        x = sharding.shard(batch, jax.local_devices()[:1])
        p_state, m = step(p_state, x)  # compile
        jax.block_until_ready(m)
        start = time.perf_counter()
        for _ in range(args.train_reps):
            p_state, m = step(p_state, x)
        jax.block_until_ready(m)
        sec = (time.perf_counter() - start) / args.train_reps
        rows.append(dict(case=f"ResNet-18 MoCo v2 step, {name}", batch=batch.shape[1],
                         ms_per_step=1000 * sec, images_per_s=batch.shape[1] / sec))
    return rows


def environment() -> dict:
    import PIL
    versions = dict(python=platform.python_version(), jax=jax.__version__, numpy=np.__version__,
                    pillow=PIL.__version__)
    try:
        import tensorflow as tf
        versions["tensorflow"] = tf.__version__
    except ImportError:
        pass
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{cpu}, {os.cpu_count()} cores", device=str(jax.devices()[0]),
                load_average=os.getloadavg(), **versions)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar_dir", type=Path, default=SHARED / "cifar10")
    parser.add_argument("--imagenette_dir", type=Path, default=SHARED / "imagenette_sample")
    cores = os.cpu_count() or 2
    parser.add_argument("--grain_workers", type=lambda v: [int(x) for x in v.split(",")],
                        default=list(range(cores + 1)), help="grain worker counts to measure, e.g. 0,1,2")
    parser.add_argument("--tf_threads", type=lambda v: [int(x) for x in v.split(",")],
                        default=list(range(1, cores + 1)), help="tf.data thread counts to measure")
    parser.add_argument("--cifar_steps", type=int, default=200)
    parser.add_argument("--jpeg_steps", type=int, default=40)
    parser.add_argument("--cifar_batch", type=int, default=256)
    parser.add_argument("--jpeg_batch", type=int, default=16)
    parser.add_argument("--aug_reps", type=int, default=5)
    parser.add_argument("--train_reps", type=int, default=3)
    parser.add_argument("--skip_train_step", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    result = dict(environment=environment(), host=[], device_augmentation=[], train_step=[])
    print(json.dumps(result["environment"]))
    if args.cifar_dir.is_dir():
        result["host"].append(host_cifar(args))
        print(json.dumps(result["host"][-1]))
    else:
        print(f"skipping the cifar10_arrays host benchmark: {args.cifar_dir} does not exist")
    if args.imagenette_dir.is_dir():
        result["host"] += host_imagenette_rows(args)
    else:
        print(f"skipping the imagenette host benchmark: {args.imagenette_dir} does not exist")
    for row in device_augmentation(args):
        result["device_augmentation"].append(row)
        print(json.dumps(row))
    if not args.skip_train_step:
        for row in train_step(args):
            result["train_step"].append(row)
            print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
