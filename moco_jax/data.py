"""Datasets and the host -> device feed for MoCo pretraining.

Everything here is numpy + Pillow so that importing this module stays cheap:
heavier sources (tensorflow-datasets, image folders) will be added later
behind lazy imports inside their loader functions, never at module level.

Layout conventions (shapes):
  images  uint8 (N, H, W, 3), labels int32 (N,)
  a host batch for pmap: uint8 (num_local_devices, per_device_batch, H, W, 3)
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from PIL import Image

from moco_jax import sharding

# Environment variable that overrides where the CIFAR-10 mosaics are read from.
CIFAR10_DIR_ENV = "MOCO_JAX_CIFAR10_DIR"
CIFAR10_FILES = (
    "cifar10_train_q95.jpg",
    "cifar10_test_lossless.webp",
    "cifar10_labels.npz",
)
# The mesh axis name must match the trainer's pmap axis name, otherwise pmap
# treats the input as differently sharded and reshards / recompiles.


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A labelled image dataset held fully in host memory.

    Attributes:
      train_images: uint8 (N_train, H, W, 3).
      train_labels: int32 (N_train,).
      test_images: uint8 (N_test, H, W, 3).
      test_labels: int32 (N_test,).
      num_classes: number of label values (labels lie in [0, num_classes)).
      name: short dataset name, e.g. 'digits'.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str


# --------------------------------------------------------------------------
# scikit-learn digits: real, tiny, bundled (no download).
# --------------------------------------------------------------------------
def _digits_to_uint8(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 8, 8) float in 0..16 -> uint8 (N, image_size, image_size, 3)."""
    gray = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    if image_size != gray.shape[1]:
        # Pillow's bilinear resize (per image; 1,797 tiny images take ~10 ms).
        gray = np.stack([
            np.asarray(Image.fromarray(g).resize(  # uint8 2-D -> mode 'L'
                (image_size, image_size), Image.Resampling.BILINEAR))
            for g in gray
        ])
    # Replicate grey to RGB so the same 3-channel model/augmentations apply.
    return np.repeat(gray[..., None], 3, axis=-1)


def _stratified_split(labels: np.ndarray, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split -> (train_idx, test_idx), disjoint, sorted."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * test_fraction))
        test.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def load_digits(image_size: int = 16, test_fraction: float = 0.2,
                seed: int = 0) -> ArrayDataset:
    """scikit-learn's 1,797 8x8 digits as a small RGB image dataset.

    Pixel values 0..16 are scaled to uint8 0..255, bilinearly upsampled with
    Pillow to image_size x image_size (no resize when image_size == 8) and
    replicated to 3 channels. The split is stratified per class and fixed by
    `seed`; every example lands in exactly one of train / test.

    Returns:
      ArrayDataset with images uint8 (N, image_size, image_size, 3), 10 classes.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as _sk_load_digits  # lazy: slow import

    raw = _sk_load_digits()
    images = _digits_to_uint8(raw.images, image_size)
    labels = raw.target.astype(np.int32)
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    return ArrayDataset(images[train_idx], labels[train_idx],
                        images[test_idx], labels[test_idx],
                        num_classes=10, name="digits")


# --------------------------------------------------------------------------
# CIFAR-10 from the shared mosaics (see ../shared/data/README.md).
# --------------------------------------------------------------------------
def _untile(mosaic: np.ndarray, rows: int, cols: int, size: int = 32) -> np.ndarray:
    """(rows*size, cols*size, 3) mosaic -> (rows*cols, size, size, 3), row-major."""
    return (mosaic.reshape(rows, size, cols, size, 3)
            .transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3))


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_cifar10_arrays(data_dir) -> ArrayDataset:
    """CIFAR-10 decoded from the shared mosaics in `data_dir`.

    Train: 50,000 images from the 8000x6400 JPEG mosaic (200 rows x 250 cols);
    test: 10,000 exact images from the 3200x3200 lossless WebP (100 x 100);
    labels from cifar10_labels.npz (y_train, y_test).

    Returns:
      ArrayDataset, images uint8 (N, 32, 32, 3), labels int32 (N,), 10 classes.
    Raises:
      FileNotFoundError: naming the directory and the missing files.
    """
    data_dir = Path(data_dir)
    missing = [f for f in CIFAR10_FILES if not (data_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 mosaics not found in {data_dir}: missing {missing} "
            f"(expected files: {list(CIFAR10_FILES)})")
    x_train = _untile(_read_rgb(data_dir / CIFAR10_FILES[0]), 200, 250)
    x_test = _untile(_read_rgb(data_dir / CIFAR10_FILES[1]), 100, 100)
    with np.load(data_dir / CIFAR10_FILES[2]) as npz:
        y_train = npz["y_train"].astype(np.int32)
        y_test = npz["y_test"].astype(np.int32)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(
            f"CIFAR-10 images/labels disagree: train {len(x_train)}/{len(y_train)}, "
            f"test {len(x_test)}/{len(y_test)}")
    return ArrayDataset(x_train, y_train, x_test, y_test,
                        num_classes=10, name="cifar10_arrays")


def default_cifar10_dir() -> Optional[Path]:
    """$MOCO_JAX_CIFAR10_DIR, else ../shared/data/cifar10 next to the repo, else None."""
    env = os.environ.get(CIFAR10_DIR_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[1]
    candidate = repo_root.parent / "shared" / "data" / "cifar10"
    return candidate if candidate.is_dir() else None


def _load_cifar10_by_name(data_dir=None, image_size=None) -> ArrayDataset:
    if image_size not in (None, 32):
        raise ValueError(f"cifar10_arrays is 32x32; image_size={image_size} unsupported")
    data_dir = data_dir if data_dir is not None else default_cifar10_dir()
    if data_dir is None:
        raise FileNotFoundError(
            "No data_dir given for cifar10_arrays and ../shared/data/cifar10 next "
            f"to the repo does not exist (set ${CIFAR10_DIR_ENV} or pass data_dir); "
            f"expected files: {list(CIFAR10_FILES)}")
    return load_cifar10_arrays(data_dir)


def _load_digits_by_name(data_dir=None, image_size=None) -> ArrayDataset:
    del data_dir  # bundled with scikit-learn
    return load_digits(image_size=16 if image_size is None else image_size)


# name -> loader(data_dir, image_size). Later sources register here too.
ARRAY_DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "digits": _load_digits_by_name,
    "cifar10_arrays": _load_cifar10_by_name,
}


def load_array_dataset(name: str, data_dir=None, image_size=None) -> ArrayDataset:
    """Load an in-memory dataset by name ('digits' or 'cifar10_arrays').

    Returns:
      ArrayDataset (see its docstring for shapes).
    Raises:
      ValueError: unknown name (the message lists the known ones).
    """
    if name not in ARRAY_DATASETS:
        raise ValueError(f"Unknown array dataset {name!r}; known: {sorted(ARRAY_DATASETS)}")
    return ARRAY_DATASETS[name](data_dir=data_dir, image_size=image_size)


# --------------------------------------------------------------------------
# Batching: deterministic, resumable, multi-process aware.
# --------------------------------------------------------------------------
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffle order of epoch `epoch`: int64 (num_examples,), a permutation.

    Seeded by (seed, epoch) so any epoch can be recomputed directly on resume
    and on every process without replaying earlier epochs.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch; the partial remainder is dropped.

    MoCo enqueues whole batches into its key queue, so every step needs a full
    batch. Raises ValueError when not even one full batch fits.
    """
    steps = num_examples // global_batch
    if steps == 0:
        raise ValueError(
            f"global_batch={global_batch} exceeds the {num_examples} examples: "
            "no full batch per epoch")
    return steps


def _local_batch_size(global_batch: int, process_count: int,
                      num_local_devices: int) -> int:
    """Per-process batch size, validating that the splits are exact."""
    if global_batch % process_count:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by process_count={process_count}")
    local = global_batch // process_count
    if local % num_local_devices:
        raise ValueError(
            f"per-process batch {local} (global_batch={global_batch} / "
            f"process_count={process_count}) is not divisible by "
            f"num_local_devices={num_local_devices}")
    return local


def array_batches(images: np.ndarray, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  num_local_devices: int = 1) -> Iterator[np.ndarray]:
    """Infinite, resumable stream of this process's share of each global batch.

    Global step s (epoch e = s // steps_per_epoch) uses the global batch
    epoch_permutation(N, seed, e)[(s % spe) * global_batch:][:global_batch];
    process p takes its contiguous p-th 1/process_count slice of it.

    Args:
      images: uint8 (N, H, W, C).
    Yields:
      uint8 (num_local_devices, global_batch // process_count // num_local_devices,
      H, W, C), starting at global step `start_step`.
    Raises (eagerly, at call time):
      ValueError: bad divisibility, process_index, start_step or image shape.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    local = _local_batch_size(global_batch, process_count, num_local_devices)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    spe = steps_per_epoch(len(images), global_batch)
    # Validation above runs now; the generator below only runs on next().
    return _batch_generator(images, global_batch, seed, start_step, spe,
                            process_index * local, local, num_local_devices)


def _batch_generator(images, global_batch, seed, step, spe, offset, local,
                     num_local_devices):
    epoch, perm = None, None
    while True:
        if step // spe != epoch:
            epoch = step // spe
            perm = epoch_permutation(len(images), seed, epoch)
        start = (step % spe) * global_batch + offset
        batch = images[perm[start:start + local]]
        yield batch.reshape(num_local_devices, local // num_local_devices,
                            *images.shape[1:])
        step += 1


# --------------------------------------------------------------------------
# Host -> device.
# --------------------------------------------------------------------------
def shard_to_devices(batch, devices: Optional[Sequence] = None):
    """Place a host pytree of (num_local_devices, ...) arrays for jax.pmap:
    slice i on local device i (see `moco_jax.sharding.shard`)."""
    return sharding.shard(batch, devices)


def prefetch_to_device(iterator: Iterator, size: int = 2,
                       devices: Optional[Sequence] = None) -> Iterator:
    """Yield shard_to_devices(x) for x in iterator, `size` batches ahead.

    device_put is asynchronous, so keeping `size` transfers in flight lets
    the host->device copy of the next batches overlap the current step.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    queue = collections.deque()
    iterator = iter(iterator)

    def enqueue(n):
        for batch in itertools.islice(iterator, n):
            queue.append(shard_to_devices(batch, devices))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
