"""The in-memory datasets: scikit-learn's digits (bundled, no download) and
CIFAR-10 from the shared mosaics. numpy + Pillow only: no TensorFlow.

The source ships whole uint8 images; the device crops them
(`augment.make_views_fn`). Its labelled streams index the arrays: split
'' or 'train' is the train arrays, any other name (the configs' eval_split,
'test') the test arrays; both at their own size, whatever size the caller
asks for."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

from moco_jax.core.errors import ConfigError, InputError, NotFoundError
from moco_jax.data.source import (
    ArrayDataset,
    Source,
    SourceConfig,
    array_batches,
    check_stream,
    eval_positions,
    knn_subset,
    local_batch_indices,
    num_eval_steps,
)

# Environment variable that overrides where the CIFAR-10 mosaics are read from.
CIFAR10_DIR_ENV = "MOCO_JAX_CIFAR10_DIR"
CIFAR10_FILES = (
    "cifar10_train_q95.jpg",
    "cifar10_test_lossless.webp",
    "cifar10_labels.npz",
)


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
        raise NotFoundError(
            f"CIFAR-10 mosaics not found in {data_dir}: missing {missing} "
            f"(expected files: {list(CIFAR10_FILES)})")
    try:
        x_train = _untile(_read_rgb(data_dir / CIFAR10_FILES[0]), 200, 250)
        x_test = _untile(_read_rgb(data_dir / CIFAR10_FILES[1]), 100, 100)
        with np.load(data_dir / CIFAR10_FILES[2]) as npz:
            y_train = npz["y_train"].astype(np.int32)
            y_test = npz["y_test"].astype(np.int32)
    except (OSError, ValueError, KeyError) as e:  # undecodable, wrong size, or labels missing
        raise InputError(f"{data_dir} does not hold readable CIFAR-10 mosaics (expected {list(CIFAR10_FILES)} "
                         f"as in ../shared/data/README.md): {type(e).__name__}: {e}") from e
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise InputError(
            f"CIFAR-10 images/labels in {data_dir} disagree: train {len(x_train)}/{len(y_train)}, "
            f"test {len(x_test)}/{len(y_test)}")
    return ArrayDataset(x_train, y_train, x_test, y_test,
                        num_classes=10, name="cifar10_arrays")


def default_cifar10_dir() -> Optional[Path]:
    """$MOCO_JAX_CIFAR10_DIR, else ../shared/data/cifar10 next to the repo, else None."""
    env = os.environ.get(CIFAR10_DIR_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[3]
    candidate = repo_root.parent / "shared" / "data" / "cifar10"
    return candidate if candidate.is_dir() else None


def _load_cifar10_by_name(data_dir=None, image_size=None) -> ArrayDataset:
    if image_size not in (None, CIFAR10_SIZE):
        raise ConfigError(f"image_size={image_size} must be 0 or 32: cifar10_arrays is 32x32")
    data_dir = data_dir if data_dir is not None else default_cifar10_dir()
    if data_dir is None:
        raise NotFoundError(
            "No data_dir given for cifar10_arrays and ../shared/data/cifar10 next "
            f"to the repo does not exist (set ${CIFAR10_DIR_ENV} or pass data_dir); "
            f"expected files: {list(CIFAR10_FILES)}")
    return load_cifar10_arrays(data_dir)


def _load_digits_by_name(data_dir=None, image_size=None) -> ArrayDataset:
    del data_dir  # bundled with scikit-learn
    return load_digits(image_size=DIGITS_SIZE if image_size is None else image_size)


# The side of each in-memory dataset's images with image_size=0, and the one
# side it may come at (None: any, upsampled).
ARRAY_IMAGE_SIZES = {"digits": (16, None), "cifar10_arrays": (32, 32)}


def check(config) -> None:
    """The crop must fit in the images an in-memory dataset is loaded at
    (digits are upsampled to image_size, 16 by default; cifar10_arrays is
    32x32). Files (image folders, tensorflow-datasets) are cropped at their
    own size, so any crop_size fits them."""
    if config.dataset not in ARRAY_IMAGE_SIZES:
        return
    default, fixed = ARRAY_IMAGE_SIZES[config.dataset]
    if fixed and config.image_size not in (0, fixed):
        raise ConfigError(f"image_size={config.image_size} must be 0 or {fixed}: {config.dataset} is {fixed}x{fixed}")
    size = config.image_size or default
    if config.crop_size > size:
        how = f"or image_size >= {config.crop_size} (the images are upsampled to it)" if not fixed else ""
        raise ConfigError(
            f"crop_size={config.crop_size} is larger than the {size}x{size} {config.dataset} images "
            f"(image_size={config.image_size}): set crop_size <= {size} {how}".strip())


DIGITS_SIZE = ARRAY_IMAGE_SIZES["digits"][0]  # image_size=0: digits upsampled from 8x8 to 16x16
CIFAR10_SIZE = ARRAY_IMAGE_SIZES["cifar10_arrays"][1]

# name -> loader(data_dir, image_size) of the in-memory datasets.
ARRAY_DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "digits": _load_digits_by_name,
    "cifar10_arrays": _load_cifar10_by_name,
}


@functools.lru_cache(maxsize=2)
def load_array_dataset(name: str, data_dir=None, image_size=None) -> ArrayDataset:
    """Load an in-memory dataset by name ('digits' or 'cifar10_arrays').

    Cached (the last two): CIFAR-10 takes about a second to decode, and
    evaluation after pretraining in one process reads the same arrays again.

    Returns:
      ArrayDataset (see its docstring for shapes).
    Raises:
      ValueError: unknown name (the message lists the known ones).
    """
    if name not in ARRAY_DATASETS:
        raise ConfigError(f"unknown array dataset {name!r}; known: {sorted(ARRAY_DATASETS)}")
    return ARRAY_DATASETS[name](data_dir=data_dir, image_size=image_size)


# --------------------------------------------------------------------------
# The source.
# --------------------------------------------------------------------------
class ArraySource(Source):
    """An `ArrayDataset` as a source; `train_index` selects the pretraining
    examples (None: all)."""

    host_cropped = False

    def __init__(self, dataset: ArrayDataset, train_index: Optional[np.ndarray] = None):
        self.dataset, self.name = dataset, dataset.name
        self._train_index = train_index

    @property
    def _train_images(self) -> np.ndarray:
        images = self.dataset.train_images
        return images if self._train_index is None else images[self._train_index]

    @property
    def _train_labels(self) -> np.ndarray:
        """int32 (N,): the labels of `_train_images`."""
        labels = self.dataset.train_labels
        return labels if self._train_index is None else labels[self._train_index]

    @property
    def num_train_examples(self) -> int:
        return len(self._train_images)

    def train_batches(self, *, global_batch, seed, start_step=0, process_index=0, process_count=1,
                      num_local_devices=1, crop_size=0, crop_scale=(0.08, 1.0), labels=False) -> Iterator:
        """Whole images (the device crops them): uint8 (n, b, H, W, 3), with
        `labels` (images, int32 (n, b)) from the train labels."""
        del crop_size, crop_scale
        return array_batches(self._train_images, global_batch, seed, start_step, process_index,
                             process_count, num_local_devices, labels=self._train_labels if labels else None)

    def labelled_arrays(self, *, size, crop_fraction=1.0, max_train_images=0, seed=0,
                        train_split="") -> ArrayDataset:
        del size, crop_fraction, train_split  # the arrays as they are, one fixed split
        ds = self.dataset
        keep = knn_subset(len(ds.train_images), max_train_images, seed)
        if len(keep) < len(ds.train_images):
            ds = dataclasses.replace(ds, train_images=ds.train_images[keep], train_labels=ds.train_labels[keep])
        return ds

    def num_classes(self) -> int:
        return self.dataset.num_classes

    def _labelled(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (N, H, W, 3), labels int32 (N,)) of `split`: '' or
        'train' the train arrays (all of them, whatever `with_train_subset`
        chose), any other name the test arrays."""
        ds = self.dataset
        if split in TRAIN_SPLITS:
            return ds.train_images, ds.train_labels
        return ds.test_images, ds.test_labels

    def num_labelled(self, split="", max_images=0, seed=0) -> int:
        return len(knn_subset(len(self._labelled(split)[1]), max_images, seed))

    def labelled_train_batches(self, *, global_batch, seed, crop_size, crop_scale=(0.08, 1.0), start_step=0,
                               process_index=0, process_count=1, num_local_devices=1, split="",
                               max_images=0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Whole images (the device crops them): (uint8 (n, b, H, W, 3), int32 (n, b))."""
        del crop_size, crop_scale
        images, labels = self._labelled(split)
        subset = knn_subset(len(labels), max_images, seed)
        order = local_batch_indices(len(subset), global_batch, seed, start_step, process_index, process_count,
                                    num_local_devices)
        return (_per_device(images[subset[i]], labels[subset[i]], n=num_local_devices) for i in order)

    def eval_batches(self, *, split, size, crop_fraction, global_batch, process_index=0, process_count=1,
                     num_local_devices=1, max_images=0, seed=0) -> Iterator[tuple[np.ndarray, ...]]:
        """The arrays as they are: (uint8 (n, b, H, W, 3), int32 (n, b), bool (n, b))."""
        del size, crop_fraction
        check_stream(global_batch, 0, process_index, process_count, num_local_devices)
        images, labels = self._labelled(split)
        subset = knn_subset(len(labels), max_images, seed)
        return (_eval_step(images, labels, subset, eval_positions(global_batch, s, process_index, process_count),
                           num_local_devices)
                for s in range(num_eval_steps(len(subset), global_batch)))

    def with_train_subset(self, size: int, seed: int) -> "ArraySource":
        """The subset is `knn_subset(N, size, seed)`, so a kNN bank capped at the
        same number (`knn_max_train_images`) is the very same images."""
        if not size:
            return self
        return ArraySource(self.dataset, knn_subset(len(self.dataset.train_images), size, seed))


TRAIN_SPLITS = ("", "train")  # the split names of the train arrays; any other is the test arrays


def _per_device(*arrays: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Each (local, ...) array as (n, local // n, ...)."""
    return tuple(a.reshape(n, -1, *a.shape[1:]) for a in arrays)


def _eval_step(images, labels, subset, positions, n) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One evaluation step of the arrays at `positions` of `subset`, padded:
    (uint8 (n, b, H, W, 3), int32 (n, b), bool (n, b))."""
    valid = positions < len(subset)
    index = subset[positions[valid]]
    x = np.zeros((len(positions), *images.shape[1:]), images.dtype)
    y = np.zeros(len(positions), np.int32)
    x[:len(index)], y[:len(index)] = images[index], labels[index]
    return _per_device(x, y, valid, n=n)


def open_source(spec: SourceConfig) -> ArraySource:
    """`spec.dataset` ('digits' or 'cifar10_arrays') at `spec.image_size` (0 = its own)."""
    return ArraySource(load_array_dataset(spec.dataset, spec.data_dir or None, spec.image_size or None))
