"""A folder of images as a MoCo dataset: `root/<class>/*.jpg|png` (class
folders optional: images directly in `root` get label -1).

The folder is listed once, when the source is opened. Decoding and cropping
run in grain (`moco_jax.data.grain_stream`, Pillow in worker processes; the
default, no TensorFlow needed) or, with `data_loader='tf'`, in tf.data
(`moco_jax.data.tf_images`, imported only then). The example order is the
one of every source, `source.local_batch_indices`: deterministic for a seed,
reshuffled each epoch, resumable at any step, a disjoint slice per process;
both pipelines read the same images at every step (their crops differ: each
seeds its own random numbers).

Undecodable files (corrupt, truncated, not an image): by default the first
one stops the run with an error naming it. With `skip_corrupt_images` each is
logged with its name and a running count, and its slot in the batch is
filled with another image of the same batch, so batches stay full and a
resumed run still sees the same batches.
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from moco_jax.core.errors import ConfigError, InputError, NotFoundError
from moco_jax.data.source import (ArrayDataset, Source, SourceConfig, UndecodableImageError, check_decode_size,
                                  choose_loader, knn_subset, local_batch_indices)

__all__ = ["FileImages", "ImageFiles", "ImageFolderSource", "UndecodableImageError", "list_image_files"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
NO_LABEL = -1


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """The images of one folder tree.

    Attributes:
      paths: str (N,), sorted by class, then file name.
      labels: int32 (N,), index into class_names, or NO_LABEL for files in root.
      class_names: sorted names of the class folders that hold images.
      root: the folder.
    """

    paths: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    root: Path


@dataclasses.dataclass(frozen=True)
class FileImages:
    """Image files as `grain_stream.EncodedImages` (pickles as the paths)."""

    paths: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def describe(self, index: int) -> str:
        return f"file {self.paths[index]}"


def _images_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_image_files(root) -> ImageFiles:
    """All images in `root` and its direct sub-folders (the classes).

    Raises:
      FileNotFoundError: `root` is not a folder or holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"image folder {root} does not exist")
    paths = _images_in(root)
    labels, classes = [NO_LABEL] * len(paths), []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sub in subdirs:
        files = _images_in(sub)
        if files:
            labels += [len(classes)] * len(files)
            paths += files
            classes.append(sub.name)
    if not paths:
        raise NotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root} or its sub-folders")
    return ImageFiles(np.asarray(paths), np.asarray(labels, np.int32), tuple(classes), root)


def split_folder(data_dir, split: str) -> Path:
    """data_dir/split, or data_dir itself when split is ''."""
    return Path(data_dir) / split if split else Path(data_dir)


def _split_files(data_dir, split: str, field: str) -> ImageFiles:
    folder = split_folder(data_dir, split)
    if not folder.is_dir():
        raise NotFoundError(
            f"image folder {folder} does not exist (data_dir={data_dir}, {field}={split!r}; "
            f"{field}='' reads data_dir itself)")
    return list_image_files(folder)


class ImageFolderSource(Source):
    """`data_dir/<train_split>` for pretraining (two host crops per image);
    `data_dir/<train_split>` and `data_dir/<eval_split>`, matched by class
    folder names, as the labelled arrays."""

    host_cropped = True

    def __init__(self, spec: SourceConfig):
        if not spec.data_dir:
            raise ConfigError("dataset='image_folder' needs a data_dir: --config.data_dir=ROOT (knn_eval: "
                              "--data_dir=ROOT), with the images in ROOT/<train_split>/<class>/")
        self.spec = spec
        self.loader = choose_loader(spec)
        self.files = _split_files(spec.data_dir, spec.train_split, "train_split")
        self.name = f"image_folder:{self.files.root}"
        logging.info("image folder %s: %d images, %d classes, decoded by %s", self.files.root,
                     len(self.files.paths), len(self.files.class_names), describe_loader(self.loader, spec))

    @property
    def num_train_examples(self) -> int:
        return len(self.files.paths)

    def train_batches(self, *, global_batch, seed, start_step=0, process_index=0, process_count=1,
                      num_local_devices=1, crop_size=0, crop_scale=(0.08, 1.0)) -> Iterator[np.ndarray]:
        if self.loader == "grain":
            from moco_jax.data import grain_stream
            return grain_stream.two_crop_batches(
                FileImages(self.files.paths), global_batch=global_batch, seed=seed, crop_size=crop_size,
                crop_scale=crop_scale, start_step=start_step, process_index=process_index,
                process_count=process_count, num_local_devices=num_local_devices,
                options=grain_stream.Options.from_spec(self.spec))
        return two_crop_batches(
            self.files.paths, global_batch=global_batch, seed=seed, crop_size=crop_size,
            crop_scale=tuple(crop_scale), start_step=start_step, process_index=process_index,
            process_count=process_count, num_local_devices=num_local_devices,
            skip_corrupt=self.spec.skip_corrupt_images, num_threads=self.spec.num_threads)

    def labelled_arrays(self, *, size, crop_fraction=1.0, max_train_images=0, seed=0,
                        train_split="") -> ArrayDataset:
        """Classes are matched by folder name; the eval images of a class the
        train folder lacks are an error."""
        check_decode_size(self.name, size)
        spec = self.spec
        train = (self.files if train_split in ("", spec.train_split)
                 else _split_files(spec.data_dir, train_split, "knn_train_split"))
        if not spec.eval_split:
            raise ConfigError("the kNN monitor and the linear probe need labelled eval images: set "
                             "--config.eval_split to a sub-folder of data_dir (e.g. 'val')")
        test = _split_files(spec.data_dir, spec.eval_split, "eval_split")
        unknown = sorted(set(test.class_names) - set(train.class_names))
        if not train.class_names or unknown or (test.labels == NO_LABEL).any():
            raise InputError(
                f"labelled images need class folders in both {train.root} and {test.root}, with the same "
                f"names (eval classes missing from train: {unknown[:5]})")
        to_train_label = np.asarray([train.class_names.index(c) for c in test.class_names], np.int32)
        keep = knn_subset(len(train.paths), max_train_images, seed)
        train_images, train_kept = self._center_crops(train.paths[keep], size, crop_fraction)
        test_images, test_kept = self._center_crops(test.paths, size, crop_fraction)
        return ArrayDataset(
            train_images, train.labels[keep][train_kept],
            test_images, to_train_label[test.labels[test_kept]],
            num_classes=len(train.class_names), name=self.name)

    def _center_crops(self, paths, size, crop_fraction):
        if self.loader == "grain":
            from moco_jax.data import grain_stream
            return grain_stream.center_crops(FileImages(paths), np.arange(len(paths)), size,
                                             crop_fraction=crop_fraction,
                                             options=grain_stream.Options.from_spec(self.spec))
        return center_crops(paths, size, crop_fraction=crop_fraction, skip_corrupt=self.spec.skip_corrupt_images,
                            num_threads=self.spec.num_threads)


def describe_loader(loader: str, spec: SourceConfig) -> str:
    """For the start-up log: which pipeline decodes, with how many workers."""
    if loader == "tf":
        return f"tf.data ({spec.num_threads} threads)"
    if spec.grain_workers:
        return f"grain ({spec.grain_workers} worker processes x {spec.grain_threads} threads)"
    return f"grain ({spec.grain_threads} threads, no worker processes)"


def open_source(spec: SourceConfig) -> ImageFolderSource:
    return ImageFolderSource(spec)


# --------------------------------------------------------------------------
# Pretraining: two host crops per image.
# --------------------------------------------------------------------------
def two_crop_batches(paths: Sequence[str], *, global_batch: int, seed: int,
                     crop_size: int, crop_scale, start_step: int = 0,
                     process_index: int = 0, process_count: int = 1,
                     num_local_devices: int = 1, skip_corrupt: bool = False,
                     num_threads: int = 2) -> Iterator[np.ndarray]:
    """Two independent RandomResizedCrops of each image of each step.

    The images of step s are `local_batch_indices(len(paths), ...)`'s;
    the crops of an example are drawn from a seed fixed by (seed,
    process_index, its position in the stream), so they too repeat on resume.

    Yields:
      uint8 (num_local_devices, per_device, 2, crop_size, crop_size, 3).
    Raises (eagerly): ValueError for bad batch divisibility; while iterating,
      UndecodableImageError naming the file unless skip_corrupt.
    """
    from moco_jax.data import tf_images
    tf = tf_images.tf
    paths = np.asarray(paths)
    indices = local_batch_indices(len(paths), global_batch, seed, start_step,
                                       process_index, process_count, num_local_devices)
    # A second, identical stream tells the Python side which file sat at each
    # position, to name the ones that fail.
    expected = local_batch_indices(len(paths), global_batch, seed, start_step,
                                        process_index, process_count, num_local_devices)
    local = global_batch // process_count
    tf_images.configure(num_threads)
    path_table = tf.constant(paths)

    def load(position, index):
        encoded = tf.io.read_file(tf.gather(path_table, index))
        crops = tf_images.two_crops(encoded, tf_images.example_seed(position, seed, process_index),
                                    crop_size, crop_scale)
        return position, crops

    # One pipeline for all epochs (building one per epoch re-traces `load`,
    # which costs more than a small epoch); numpy feeds it the index order,
    # one step's indices per Python call.
    ds = (tf.data.Dataset.from_generator(lambda: indices,
                                         output_signature=tf.TensorSpec([local], tf.int64))
          .unbatch()
          .enumerate(start=start_step * local)
          .map(load, num_parallel_calls=num_threads, deterministic=True)
          # A failed decode drops the element instead of ending the stream;
          # `_aligned_steps` notices the gap and names the file.
          .ignore_errors()
          .batch(local)
          .prefetch(2)
          .with_options(tf_images.pipeline_options(num_threads)))
    chunks = ds.as_numpy_iterator()
    steps = _aligned_steps(chunks, expected, start_step, local, paths,
                           skip_corrupt, lambda p: _decode_error(p, crop_size, crop_scale))
    return (s.reshape(num_local_devices, local // num_local_devices, *s.shape[1:]) for s in steps)


def _decode_error(path: str, crop_size: int, crop_scale) -> str:
    """Why TensorFlow cannot load `path` (reproduced eagerly, outside tf.data)."""
    from moco_jax.data import tf_images
    tf = tf_images.tf
    try:
        tf_images.two_crops(tf.io.read_file(path), tf.constant([0, 0], tf.int64), crop_size, crop_scale)
    except Exception as e:  # noqa: BLE001 - any TF error is the reason we report
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return "it failed inside the pipeline but decodes on its own (transient read error?)"


def _aligned_steps(chunks, expected: Iterator[np.ndarray], step: int, local: int,
                   paths: np.ndarray, skip_corrupt: bool, explain) -> Iterator[np.ndarray]:
    """Re-cut the stream of surviving (positions, crops) chunks into steps.

    Elements that failed to decode are missing from `chunks`; each missing
    position either raises (naming the file) or, with skip_corrupt, is logged,
    counted and filled with a copy of another image of the same step.
    Yields uint8 (local, 2, S, S, 3) per step.
    """
    pending = collections.deque()  # (positions, crops) chunks not yet used up
    skipped = 0
    for step_indices in expected:
        first, end = step * local, (step + 1) * local
        step += 1
        positions, crops = _take(pending, chunks)
        if len(positions) == local and positions[0] == first and positions[-1] == end - 1:
            pending.popleft()  # the usual, gap-free case: no copy
            yield crops
            continue
        batch, ok = np.zeros((local,) + crops.shape[1:], crops.dtype), np.zeros(local, bool)
        while True:  # gather this step's elements from one or more chunks
            positions, crops = _take(pending, chunks)
            n = int(np.searchsorted(positions, end))
            batch[positions[:n] - first] = crops[:n]
            ok[positions[:n] - first] = True
            if n < len(positions):
                pending[0] = (positions[n:], crops[n:])
                break
            pending.popleft()
        for j in np.flatnonzero(~ok):
            path = paths[step_indices[j]]
            if not skip_corrupt:
                raise UndecodableImageError(
                    f"cannot decode image file {path} ({explain(path)}); remove it, or set "
                    "--config.skip_corrupt_images=True to skip undecodable images")
            skipped += 1
            logging.warning("skipping undecodable image %s (%d skipped so far)", path, skipped)
        if not ok.any():
            raise UndecodableImageError(
                f"no image of step {step - 1} could be decoded, e.g. {paths[step_indices[0]]}")
        valid = np.flatnonzero(ok)
        # Fill each gap with the nearest decoded image before it (else after).
        nearest = valid[np.clip(np.searchsorted(valid, np.arange(local)) - 1, 0, None)]
        batch[~ok] = batch[nearest[~ok]]
        yield batch


def _take(pending: collections.deque, chunks):
    """The first pending chunk, fetching the next one if none is pending."""
    if not pending:
        positions, crops = next(chunks)
        pending.append((positions, crops))
    return pending[0]


# --------------------------------------------------------------------------
# Labelled arrays: centre crops of the train and eval folders.
# --------------------------------------------------------------------------
def center_crops(paths: Sequence[str], size: int, *, crop_fraction: float = 1.0,
                 skip_corrupt: bool = False, num_threads: int = 2,
                 batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Decode, resize (shorter side) and centre-crop every file.

    Returns:
      (uint8 (M, size, size, 3), int64 (M,) indices into `paths` of the M
      decoded files, in order). Raises UndecodableImageError naming the first
      undecodable file unless skip_corrupt (then they are logged and left out).
    """
    from moco_jax.data import tf_images
    tf = tf_images.tf
    paths = np.asarray(paths)
    tf_images.configure(num_threads)
    path_table = tf.constant(paths)
    ds = (tf.data.Dataset.range(len(paths))
          .map(lambda i: (i, tf_images.center_crop(tf.io.read_file(tf.gather(path_table, i)),
                                                   size, crop_fraction)),
               num_parallel_calls=num_threads, deterministic=True)
          .ignore_errors()
          .batch(batch_size)
          .prefetch(1)
          .with_options(tf_images.pipeline_options(num_threads)))
    kept, images = [], []
    for idx, imgs in ds.as_numpy_iterator():
        kept.append(idx)
        images.append(imgs)
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    missing = np.setdiff1d(np.arange(len(paths)), kept)
    if len(missing) and not skip_corrupt:
        raise UndecodableImageError(
            f"cannot decode image file {paths[missing[0]]} "
            f"({_decode_error(paths[missing[0]], size, (1.0, 1.0))}); remove it, or set "
            "--config.skip_corrupt_images=True to skip undecodable images")
    for i in missing:
        logging.warning("skipping undecodable image %s", paths[i])
    images = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return images, kept
