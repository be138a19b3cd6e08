"""A folder of images as a MoCo dataset: `root/<class>/*.jpg|png` (class
folders optional: images directly in `root` get label -1).

The folder is listed once, when the source is opened; the source hands the
file list to a pipeline, which decodes and crops: grain
(`moco_jax.data.pipelines.grain`, Pillow in worker processes; the default,
no TensorFlow needed) or, with `data_loader='tf'`, tf.data
(`moco_jax.data.pipelines.tfdata`, imported only then). The example order is
the one of every source, `source.local_batch_indices`: deterministic for a
seed, reshuffled each epoch, resumable at any step, a disjoint slice per
process; both pipelines read the same images at every step (their crops
differ: each seeds its own random numbers).

Undecodable files (corrupt, truncated, not an image): by default the first
one stops the run with an error naming it. With `skip_corrupt_images` each is
logged with its name and a running count, and its slot in the batch is
filled with another image of the same batch, so batches stay full and a
resumed run still sees the same batches (`moco_jax.data.pipelines.undecodable`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
from absl import logging

from moco_jax.core.errors import ConfigError, InputError, NotFoundError
from moco_jax.data.source import (ArrayDataset, Source, SourceConfig, UndecodableImageError, check_decode_size,
                                  choose_loader, knn_subset)

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
    """Image files as the grain pipeline reads them (`grain.EncodedImages`;
    pickles as the paths)."""

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
            from moco_jax.data.pipelines import grain
            return grain.two_crop_batches(
                FileImages(self.files.paths), global_batch=global_batch, seed=seed, crop_size=crop_size,
                crop_scale=crop_scale, start_step=start_step, process_index=process_index,
                process_count=process_count, num_local_devices=num_local_devices,
                options=grain.Options.from_spec(self.spec))
        from moco_jax.data.pipelines import tfdata
        return tfdata.two_crop_batches(
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
            from moco_jax.data.pipelines import grain
            return grain.center_crops(FileImages(paths), np.arange(len(paths)), size, crop_fraction=crop_fraction,
                                      options=grain.Options.from_spec(self.spec))
        from moco_jax.data.pipelines import tfdata
        return tfdata.center_crops(paths, size, crop_fraction=crop_fraction,
                                   skip_corrupt=self.spec.skip_corrupt_images, num_threads=self.spec.num_threads)


def describe_loader(loader: str, spec: SourceConfig) -> str:
    """For the start-up log: which pipeline decodes, with how many workers."""
    if loader == "tf":
        return f"tf.data ({spec.num_threads} threads)"
    if spec.grain_workers:
        return f"grain ({spec.grain_workers} worker processes x {spec.grain_threads} threads)"
    return f"grain ({spec.grain_threads} threads, no worker processes)"


def open_source(spec: SourceConfig) -> ImageFolderSource:
    return ImageFolderSource(spec)
