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

Labelled images (the kNN monitor, the linear probe) come from the class
folders: labels index the train split's sorted class folder names, and the
images of any other split (eval_split) are matched to them by folder name
(a class the train split lacks is an error). They stream through the same
pipelines, each process decoding only its share (`labelled_train_batches`:
one host RandomResizedCrop per image, in the pretraining order;
`eval_batches`: the evaluation view, in order), or come as whole arrays
(`labelled_arrays`); `train_batches(labels=True)` adds the class of each
pretraining image to its crops (an online probe).

Undecodable files (corrupt, truncated, not an image): by default the first
one stops the run with an error naming it. With `skip_corrupt_images` each is
logged with its name and a running count, and its slot in the batch is
filled with another image of the same batch, so batches stay full and a
resumed run still sees the same batches (`moco_jax.data.pipelines.undecodable`);
in `eval_batches` its slot is marked not valid, and `labelled_arrays` leaves
it out.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from absl import logging

from moco_jax.core.errors import ConfigError, InputError, NotFoundError
from moco_jax.data.source import (ArrayDataset, Source, SourceConfig, UndecodableImageError, check_decode_size,
                                  check_stream, choose_loader, knn_subset)

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
    pickles as the paths and labels).

    Attributes:
      paths: str (N,).
      labels: int32 (N,), for the labelled streams (`read_labelled`); None
        for pretraining.
    """

    paths: np.ndarray
    labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def read_labelled(self, index: int) -> tuple[bytes, int]:
        return self.read(index), int(self.labels[index])

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
        self._listed: dict[str, ImageFiles] = {}  # split -> its files, labelled as the train split's classes
        logging.info("image folder %s: %d images, %d classes, decoded by %s", self.files.root,
                     len(self.files.paths), len(self.files.class_names), describe_loader(self.loader, spec))

    @property
    def num_train_examples(self) -> int:
        return len(self.files.paths)

    def train_batches(self, *, global_batch, seed, start_step=0, process_index=0, process_count=1,
                      num_local_devices=1, crop_size=0, crop_scale=(0.08, 1.0), labels=False) -> Iterator:
        """Two host crops per image, uint8 (n, b, 2, S, S, 3); with `labels`
        (crops, int32 (n, b)), the label of each file's class folder."""
        y = self._train_labels() if labels else None
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.two_crop_batches(
                FileImages(self.files.paths, y), global_batch=global_batch, seed=seed, crop_size=crop_size,
                crop_scale=crop_scale, start_step=start_step, process_index=process_index,
                process_count=process_count, num_local_devices=num_local_devices,
                options=grain.Options.from_spec(self.spec), labels=labels)
        from moco_jax.data.pipelines import tfdata
        return tfdata.two_crop_batches(
            self.files.paths, global_batch=global_batch, seed=seed, crop_size=crop_size,
            crop_scale=tuple(crop_scale), start_step=start_step, process_index=process_index,
            process_count=process_count, num_local_devices=num_local_devices,
            skip_corrupt=self.spec.skip_corrupt_images, num_threads=self.spec.num_threads, labels=y)

    def _train_labels(self) -> np.ndarray:
        """int32 (N,): the class of each pretraining file (ConfigError if one
        lies outside the class folders)."""
        outside = int((self.files.labels == NO_LABEL).sum())
        if outside:
            raise ConfigError(f"the online probe needs class folders in {self.files.root}: {outside} of its "
                              f"{len(self.files.labels)} images lie outside them (root/<class>/*.jpg)")
        return self.files.labels

    def labelled_arrays(self, *, size, crop_fraction=1.0, max_train_images=0, seed=0,
                        train_split="") -> ArrayDataset:
        """Classes are matched by folder name; the eval images of a class the
        train folder lacks are an error."""
        check_decode_size(self.name, size)
        spec = self.spec
        train = (self.files if train_split in ("", spec.train_split)
                 else _split_files(spec.data_dir, train_split, "knn_train_split"))
        _check_eval_split(spec)
        test = _split_files(spec.data_dir, spec.eval_split, "eval_split")
        to_train_label = _to_train_labels(train, test)
        keep = knn_subset(len(train.paths), max_train_images, seed)
        train_images, train_kept = self._center_crops(train.paths[keep], size, crop_fraction)
        test_images, test_kept = self._center_crops(test.paths, size, crop_fraction)
        return ArrayDataset(
            train_images, train.labels[keep][train_kept],
            test_images, to_train_label[test.labels[test_kept]],
            num_classes=len(train.class_names), name=self.name)

    def num_classes(self) -> int:
        """The train split's class folders (InputError if it has none, or
        images outside them)."""
        return len(self._labelled(self.spec.train_split).class_names)

    def _labelled(self, split: str) -> ImageFiles:
        """The files of `split` ('' = the train split), listed once, with
        labels indexing the train split's class names (InputError for
        images outside class folders, or classes the train split lacks)."""
        split = split or self.spec.train_split
        if split not in self._listed:
            files = self.files if split == self.spec.train_split else _split_files(
                self.spec.data_dir, split, "eval_split" if split == self.spec.eval_split else "split")
            to_train_label = _to_train_labels(self.files, files)
            self._listed[split] = dataclasses.replace(files, labels=to_train_label[files.labels],
                                                      class_names=self.files.class_names)
        return self._listed[split]

    def num_labelled(self, split="", max_images=0, seed=0) -> int:
        return len(knn_subset(len(self._labelled(split).paths), max_images, seed))

    def labelled_train_batches(self, *, global_batch, seed, crop_size, crop_scale=(0.08, 1.0), start_step=0,
                               process_index=0, process_count=1, num_local_devices=1, split="",
                               max_images=0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        files = self._labelled(split)
        subset = knn_subset(len(files.paths), max_images, seed)
        kwargs = dict(global_batch=global_batch, seed=seed, crop_size=crop_size, crop_scale=tuple(crop_scale),
                      start_step=start_step, process_index=process_index, process_count=process_count,
                      num_local_devices=num_local_devices)
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.labelled_batches(FileImages(files.paths, files.labels), subset,
                                          options=grain.Options.from_spec(self.spec), **kwargs)
        from moco_jax.data.pipelines import tfdata
        return tfdata.labelled_batches(files.paths, files.labels, subset=subset,
                                       skip_corrupt=self.spec.skip_corrupt_images,
                                       num_threads=self.spec.num_threads, **kwargs)

    def eval_batches(self, *, split, size, crop_fraction, global_batch, process_index=0, process_count=1,
                     num_local_devices=1, max_images=0, seed=0) -> Iterator[tuple[np.ndarray, ...]]:
        check_decode_size(self.name, size)
        check_stream(global_batch, 0, process_index, process_count, num_local_devices)
        files = self._labelled(split)
        subset = knn_subset(len(files.paths), max_images, seed)
        kwargs = dict(size=size, crop_fraction=crop_fraction, global_batch=global_batch,
                      process_index=process_index, process_count=process_count, num_local_devices=num_local_devices)
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.eval_batches(FileImages(files.paths, files.labels), subset,
                                      options=grain.Options.from_spec(self.spec), **kwargs)
        from moco_jax.data.pipelines import tfdata
        return tfdata.eval_batches(files.paths, files.labels, subset=subset,
                                   skip_corrupt=self.spec.skip_corrupt_images, num_threads=self.spec.num_threads,
                                   **kwargs)

    def _center_crops(self, paths, size, crop_fraction):
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.center_crops(FileImages(paths), np.arange(len(paths)), size, crop_fraction=crop_fraction,
                                      options=grain.Options.from_spec(self.spec))
        from moco_jax.data.pipelines import tfdata
        return tfdata.center_crops(paths, size, crop_fraction=crop_fraction,
                                   skip_corrupt=self.spec.skip_corrupt_images, num_threads=self.spec.num_threads)


def _check_eval_split(spec: SourceConfig) -> None:
    if not spec.eval_split:
        raise ConfigError("the kNN monitor and the linear probe need labelled eval images: set "
                          "--config.eval_split to a sub-folder of data_dir (e.g. 'val')")


def _to_train_labels(train: ImageFiles, other: ImageFiles) -> np.ndarray:
    """int32 (len(other.class_names),): the label in `train` of each class
    of `other`, matched by folder name.

    Raises:
      InputError: `train` has no class folders, `other` has images outside
        class folders or classes that `train` lacks.
    """
    unknown = sorted(set(other.class_names) - set(train.class_names))
    if not train.class_names or unknown or (other.labels == NO_LABEL).any():
        raise InputError(
            f"labelled images need class folders in both {train.root} and {other.root}, with the same "
            f"names (eval classes missing from train: {unknown[:5]})")
    return np.asarray([train.class_names.index(c) for c in other.class_names], np.int32)


def describe_loader(loader: str, spec: SourceConfig) -> str:
    """For the start-up log: which pipeline decodes, with how many workers."""
    if loader == "tf":
        return f"tf.data ({spec.num_threads} threads)"
    if spec.grain_workers:
        return f"grain ({spec.grain_workers} worker processes x {spec.grain_threads} threads)"
    return f"grain ({spec.grain_threads} threads, no worker processes)"


def open_source(spec: SourceConfig) -> ImageFolderSource:
    return ImageFolderSource(spec)
