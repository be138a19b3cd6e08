"""Datasets and the host -> device feed for MoCo pretraining.

Everything here is numpy + Pillow so that importing this module stays cheap
and the in-memory sources work without TensorFlow (the GPU machines have
none). The tf.data sources, image folders (`moco_jax.image_folder`) and
tensorflow-datasets (`moco_jax.tfds_source`), are imported lazily inside
`make_pretrain_input` / `load_knn_arrays`, never at module level.

Layout conventions (shapes):
  images  uint8 (N, H, W, 3), labels int32 (N,)
  a host batch for pmap: uint8 (num_local_devices, per_device_batch, H, W, 3),
  or, host-cropped, (num_local_devices, per_device_batch, 2, S, S, 3)
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

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


def local_batch_size(global_batch: int, process_count: int,
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


def local_batch_indices(num_examples: int, global_batch: int, seed: int,
                        start_step: int = 0, process_index: int = 0,
                        process_count: int = 1,
                        num_local_devices: int = 1) -> Iterator[np.ndarray]:
    """Infinite, resumable stream of the example indices of this process's
    share of each global batch; the order every source uses.

    Global step s (epoch e = s // steps_per_epoch) uses the global batch
    epoch_permutation(N, seed, e)[(s % spe) * global_batch:][:global_batch];
    process p takes its contiguous p-th 1/process_count slice of it.

    Yields:
      int64 (global_batch // process_count,), starting at global step `start_step`.
    Raises (eagerly, at call time):
      ValueError: bad divisibility, process_index or start_step.
    """
    local = local_batch_size(global_batch, process_count, num_local_devices)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    spe = steps_per_epoch(num_examples, global_batch)
    # Validation above runs now; the generator below only runs on next().
    return _index_generator(num_examples, global_batch, seed, start_step, spe,
                            process_index * local, local)


def _index_generator(num_examples, global_batch, seed, step, spe, offset, local):
    epoch, perm = None, None
    while True:
        if step // spe != epoch:
            epoch = step // spe
            perm = epoch_permutation(num_examples, seed, epoch)
        start = (step % spe) * global_batch + offset
        yield perm[start:start + local]
        step += 1


def array_batches(images: np.ndarray, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  num_local_devices: int = 1) -> Iterator[np.ndarray]:
    """Infinite, resumable stream of this process's share of each global batch.

    The examples of each step are those of `local_batch_indices` (same
    arguments), so the order is deterministic for a seed and a run resumed at
    `start_step` continues exactly where it stopped.

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
    indices = local_batch_indices(len(images), global_batch, seed, start_step,
                                  process_index, process_count, num_local_devices)
    return (images[idx].reshape(num_local_devices, -1, *images.shape[1:])
            for idx in indices)


# --------------------------------------------------------------------------
# The trainer's entry points: any source by name.
# --------------------------------------------------------------------------
IMAGE_FOLDER = "image_folder"


@dataclasses.dataclass(frozen=True)
class PretrainInput:
    """This process's pretraining stream and what the trainer needs to know.

    Attributes:
      batches: infinite iterator of host uint8 arrays, one per global step,
        starting at `start_step`:
        (num_local_devices, per_device, H, W, 3) when `host_cropped` is False
        (whole images; `augment.make_views_fn` crops on the device), or
        (num_local_devices, per_device, 2, S, S, 3) when True (two independent
        RandomResizedCrops per image, S = config.crop_size).
      num_train_examples: examples in the whole train split (all processes).
      steps_per_epoch: full global batches per epoch (the remainder is dropped).
      host_cropped: see `batches`.
    """

    batches: Iterator[np.ndarray]
    num_train_examples: int
    steps_per_epoch: int
    host_cropped: bool


def source_kind(dataset: str) -> str:
    """'arrays' (in memory, no TensorFlow), 'image_folder' or 'tfds'.

    Names in ARRAY_DATASETS and 'image_folder' are ours; any other name is a
    tensorflow-datasets name (e.g. 'cifar10', 'imagenette/320px-v2',
    'stl10'), optionally written 'tfds:NAME'.
    """
    if dataset in ARRAY_DATASETS:
        return "arrays"
    if dataset == IMAGE_FOLDER:
        return IMAGE_FOLDER
    return "tfds"


@functools.lru_cache(maxsize=2)
def _cached_array_dataset(name: str, data_dir, image_size) -> ArrayDataset:
    # The trainer asks for the same arrays twice (pretraining and the kNN
    # bank); CIFAR-10 takes about a second to decode.
    return load_array_dataset(name, data_dir, image_size)


def count_train_examples(config) -> int:
    """Examples in the pretraining split of config.dataset, without building
    the pipeline: the trainer needs steps_per_epoch for the learning-rate
    schedule before it knows the step it resumes from."""
    kind = source_kind(config.dataset)
    _check_train_subset(config, kind)
    if kind == "arrays":
        return len(_array_train_images(config))
    if kind == IMAGE_FOLDER:
        from moco_jax import image_folder  # lazy: needs TensorFlow only for decoding
        return len(image_folder.train_files(config).paths)
    from moco_jax import tfds_source  # lazy: needs TensorFlow
    return tfds_source.count_train_examples(config)


def make_pretrain_input(config, *, start_step: int, process_index: int,
                        process_count: int, num_local_devices: int) -> PretrainInput:
    """The pretraining input of `config.dataset` for this process.

    Array sources ship whole images (the device crops them); image folders
    and tensorflow-datasets decode and crop on the host in tf.data.
    Every source drops the last partial batch, reshuffles each epoch with an
    order fixed by `config.seed`, and starts at global step `start_step`.
    """
    kind = source_kind(config.dataset)
    _check_train_subset(config, kind)
    if kind == "arrays":
        images = _array_train_images(config)
        batches = array_batches(images, config.batch_size, config.seed,
                                start_step, process_index, process_count, num_local_devices)
        return PretrainInput(batches, len(images), steps_per_epoch(len(images), config.batch_size),
                             host_cropped=False)
    kwargs = dict(start_step=start_step, process_index=process_index,
                  process_count=process_count, num_local_devices=num_local_devices)
    if kind == IMAGE_FOLDER:
        from moco_jax import image_folder  # lazy: needs TensorFlow
        return image_folder.make_pretrain_input(config, **kwargs)
    from moco_jax import tfds_source  # lazy: needs TensorFlow
    return tfds_source.make_pretrain_input(config, **kwargs)


def _check_train_subset(config, kind: str) -> None:
    if config.get("train_subset", 0) and kind != "arrays":
        raise ValueError(
            f"train_subset works for the in-memory datasets; for {config.dataset!r} select a subset with "
            "the split, e.g. --config.train_split='train[:10000]' (tensorflow-datasets slicing)")


def _array_train_images(config) -> np.ndarray:
    """The pretraining images of an array dataset: all of them, or the fixed
    random subset of `config.train_subset` (0 = all) images. The subset is
    `knn_subset(N, train_subset, seed)`, so a kNN bank capped at the same
    number (`knn_max_train_images`) is the very same images."""
    ds = _cached_array_dataset(config.dataset, config.data_dir or None, config.image_size)
    cap = config.get("train_subset", 0)
    return ds.train_images[knn_subset(len(ds.train_images), cap, config.seed)] if cap else ds.train_images


def load_knn_arrays(config) -> ArrayDataset:
    """Un-augmented images for the kNN monitor, in host memory.

    train_* is the feature bank (config.knn_train_split, '' = train_split, at
    most config.knn_max_train_images of them, 0 = all), test_* the
    config.eval_split; labelled. Image-folder and tensorflow-datasets images
    are resized (shorter side) and centre-cropped to config.crop_size; the
    array sources are returned as they are.
    """
    kind = source_kind(config.dataset)
    if kind == "arrays":
        ds = _cached_array_dataset(config.dataset, config.data_dir or None, config.image_size)
        keep = knn_subset(len(ds.train_images), config.get("knn_max_train_images", 0), config.seed)
        if len(keep) < len(ds.train_images):
            ds = dataclasses.replace(ds, train_images=ds.train_images[keep],
                                     train_labels=ds.train_labels[keep])
        return ds
    if kind == IMAGE_FOLDER:
        from moco_jax import image_folder  # lazy: needs TensorFlow
        return image_folder.load_knn_arrays(config)
    from moco_jax import tfds_source  # lazy: needs TensorFlow
    return tfds_source.load_knn_arrays(config)


def knn_subset(num_examples: int, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `cap` examples (all when cap <= 0), drawn
    without replacement by `seed`: int64 (min(cap, N),)."""
    if cap <= 0 or cap >= num_examples:
        return np.arange(num_examples)
    return np.sort(np.random.default_rng(seed).permutation(num_examples)[:cap])


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
