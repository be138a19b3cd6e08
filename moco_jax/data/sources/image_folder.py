"""A folder of images as a MoCo dataset: `root/<class>/*.jpg|png` (class
folders optional: images directly in `root` get label -1).

The folder is listed once per job, when the source is opened: process 0
lists it and writes an index file (`file_index`: in data_dir/.moco_jax_index,
or `index_dir`, or the trainer's workdir/data_index), which the other
processes, later launches and the evaluation programs read, memory-mapped,
while the folder is unchanged. The source hands the file table (which
pickles as the index file's name) to a pipeline, which decodes and crops: grain
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
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from absl import logging

from moco_jax.core.errors import ConfigError, InputError, NotFoundError
from moco_jax.data import host_resources
from moco_jax.data.source import (ArrayDataset, Source, SourceConfig, UndecodableImageError, check_decode_size,
                                  check_stream, choose_loader, knn_subset)
from moco_jax.data.sources import file_index
from moco_jax.data.sources.file_index import IMAGE_EXTENSIONS, NO_LABEL, FileTable

__all__ = ["FileImages", "FileTable", "IMAGE_EXTENSIONS", "ImageFiles", "ImageFolderSource", "NO_LABEL",
           "UndecodableImageError", "list_image_files"]

LISTS_FILES = True  # `data.open_source` passes the index fallback folder and the process index


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """The images of one folder tree, in memory (`list_image_files`; the
    source itself reads a `FileTable`).

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
    """Image files as the grain pipeline reads them (`grain.EncodedImages`).
    Pickles as its table: an index file's name, whatever the number of files.

    Attributes:
      files: the FileTable (str (N,) paths are turned into an in-memory one).
      labelled: whether the labelled streams read it (`read_labelled`: the
        table's labels).
    """

    files: FileTable
    labelled: bool = False

    def __post_init__(self):
        if not isinstance(self.files, FileTable):
            object.__setattr__(self, "files", FileTable.from_paths(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> bytes:
        with open(self.files.path(index), "rb") as f:
            return f.read()

    def read_labelled(self, index: int) -> tuple[bytes, int]:
        if not self.labelled:
            raise TypeError("FileImages(labelled=False) has no labels")  # not a decode error: grain re-raises it
        return self.read(index), self.files.label(index)

    def describe(self, index: int) -> str:
        return f"file {self.files.path(index)}"


def list_image_files(root) -> ImageFiles:
    """All images in `root` and its direct sub-folders (the classes), in
    memory (`file_index.list_folder`: no index file).

    Raises:
      FileNotFoundError: `root` is not a folder or holds no image.
    """
    root = Path(root)
    listing = file_index.list_folder(root)
    paths = np.asarray([str(root / name) for name in listing.names])
    return ImageFiles(paths, listing.labels, listing.class_names, root)


def split_folder(data_dir, split: str) -> Path:
    """data_dir/split, or data_dir itself when split is ''."""
    return Path(data_dir) / split if split else Path(data_dir)


def _existing_split(data_dir, split: str, field: str) -> Path:
    """data_dir/split (`split_folder`), or NotFoundError saying which field names it."""
    folder = split_folder(data_dir, split)
    if not folder.is_dir():
        raise NotFoundError(
            f"image folder {folder} does not exist (data_dir={data_dir}, {field}={split!r}; "
            f"{field}='' reads data_dir itself)")
    return folder


def _split_files(data_dir, split: str, field: str, where: "IndexPlace") -> FileTable:
    folder = _existing_split(data_dir, split, field)
    return file_index.open_table(folder, where.folder, process_index=where.process_index, shared=where.shared)


@dataclasses.dataclass(frozen=True)
class IndexPlace:
    """Where the source's index files are (`file_index.index_location`) and
    which process this is (process 0 lists; the others wait for its file)."""

    folder: str
    shared: bool
    process_index: int = 0


class ImageFolderSource(Source):
    """`data_dir/<train_split>` for pretraining (two host crops per image);
    `data_dir/<train_split>` and `data_dir/<eval_split>`, matched by class
    folder names, as the labelled arrays."""

    host_cropped = True

    def __init__(self, spec: SourceConfig, index_fallback: str = "", process_index: Optional[int] = None):
        if not spec.data_dir:
            raise ConfigError("dataset='image_folder' needs a data_dir: --config.data_dir=ROOT (knn_eval: "
                              "--data_dir=ROOT), with the images in ROOT/<train_split>/<class>/")
        self.spec = spec
        self.loader = choose_loader(spec)
        _existing_split(spec.data_dir, spec.train_split, "train_split")  # before any word about the index
        folder, shared = file_index.index_location(spec.data_dir, spec.index_dir, index_fallback)
        self.where = IndexPlace(folder, shared, current_process() if process_index is None else process_index)
        self.files = _split_files(spec.data_dir, spec.train_split, "train_split", self.where)
        self.name = f"image_folder:{self.files.root}"
        self._listed: dict[str, FileTable] = {}  # split -> its files, labelled as the train split's classes
        logging.info("image folder %s: %d images, %d classes, decoded by %s", self.files.root,
                     len(self.files), len(self.files.class_names), describe_loader(self.loader, spec))

    @property
    def num_train_examples(self) -> int:
        return len(self.files)

    def train_batches(self, *, global_batch, seed, start_step=0, process_index=0, process_count=1,
                      num_local_devices=1, crop_size=0, crop_scale=(0.08, 1.0), labels=False) -> Iterator:
        """Two host crops per image, uint8 (n, b, 2, S, S, 3) (grain with
        resize_on_device: (slots, views), `grain.two_crop_batches`); with `labels`
        (crops, int32 (n, b)), the label of each file's class folder."""
        if labels:
            self._check_train_labels()
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.two_crop_batches(
                FileImages(self.files, labelled=labels), global_batch=global_batch, seed=seed, crop_size=crop_size,
                crop_scale=crop_scale, start_step=start_step, process_index=process_index,
                process_count=process_count, num_local_devices=num_local_devices,
                options=grain.Options.from_spec(self.spec), labels=labels)
        from moco_jax.data.pipelines import tfdata
        return tfdata.two_crop_batches(
            self.files.path_array(), global_batch=global_batch, seed=seed, crop_size=crop_size,
            crop_scale=tuple(crop_scale), start_step=start_step, process_index=process_index,
            process_count=process_count, num_local_devices=num_local_devices,
            skip_corrupt=self.spec.skip_corrupt_images, num_threads=self.spec.num_threads,
            labels=np.asarray(self.files.labels) if labels else None)

    def _check_train_labels(self) -> None:
        """ConfigError if a pretraining file lies outside the class folders."""
        outside = self.files.num_unlabelled
        if outside:
            raise ConfigError(f"the online probe needs class folders in {self.files.root}: {outside} of its "
                              f"{len(self.files)} images lie outside them (root/<class>/*.jpg)")

    def labelled_arrays(self, *, size, crop_fraction=1.0, max_train_images=0, seed=0,
                        train_split="") -> ArrayDataset:
        """Classes are matched by folder name; the eval images of a class the
        train folder lacks are an error."""
        check_decode_size(self.name, size)
        spec = self.spec
        train = (self.files if train_split in ("", spec.train_split)
                 else _split_files(spec.data_dir, train_split, "knn_train_split", self.where))
        _check_eval_split(spec)
        test = _split_files(spec.data_dir, spec.eval_split, "eval_split", self.where)
        to_train_label = _to_train_labels(train, test)
        keep = knn_subset(len(train), max_train_images, seed)
        train_images, train_kept = self._center_crops(train, keep, size, crop_fraction)
        test_images, test_kept = self._center_crops(test, np.arange(len(test)), size, crop_fraction)
        return ArrayDataset(
            train_images, np.asarray(train.labels)[keep][train_kept],
            test_images, to_train_label[np.asarray(test.labels)[test_kept]],
            num_classes=len(train.class_names), name=self.name)

    def num_classes(self) -> int:
        """The train split's class folders (InputError if it has none, or
        images outside them)."""
        return len(self._labelled(self.spec.train_split).class_names)

    def _labelled(self, split: str) -> FileTable:
        """The files of `split` ('' = the train split), opened once, with
        labels indexing the train split's class names (InputError for
        images outside class folders, or classes the train split lacks)."""
        split = split or self.spec.train_split
        if split not in self._listed:
            if split == self.spec.train_split:
                _to_train_labels(self.files, self.files)
                self._listed[split] = self.files
            else:
                files = _split_files(self.spec.data_dir, split,
                                     "eval_split" if split == self.spec.eval_split else "split", self.where)
                self._listed[split] = files.relabelled(_to_train_labels(self.files, files), self.files.class_names)
        return self._listed[split]

    def num_labelled(self, split="", max_images=0, seed=0) -> int:
        return len(knn_subset(len(self._labelled(split)), max_images, seed))

    def labelled_train_batches(self, *, global_batch, seed, crop_size, crop_scale=(0.08, 1.0), start_step=0,
                               process_index=0, process_count=1, num_local_devices=1, split="",
                               max_images=0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        files = self._labelled(split)
        subset = knn_subset(len(files), max_images, seed)
        kwargs = dict(global_batch=global_batch, seed=seed, crop_size=crop_size, crop_scale=tuple(crop_scale),
                      start_step=start_step, process_index=process_index, process_count=process_count,
                      num_local_devices=num_local_devices)
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.labelled_batches(FileImages(files, labelled=True), subset,
                                          options=grain.Options.from_spec(self.spec), **kwargs)
        from moco_jax.data.pipelines import tfdata
        return tfdata.labelled_batches(files.path_array(), np.asarray(files.labels), subset=subset,
                                       skip_corrupt=self.spec.skip_corrupt_images,
                                       num_threads=self.spec.num_threads, **kwargs)

    def eval_batches(self, *, split, size, crop_fraction, global_batch, process_index=0, process_count=1,
                     num_local_devices=1, max_images=0, seed=0) -> Iterator[tuple[np.ndarray, ...]]:
        check_decode_size(self.name, size)
        check_stream(global_batch, 0, process_index, process_count, num_local_devices)
        files = self._labelled(split)
        subset = knn_subset(len(files), max_images, seed)
        kwargs = dict(size=size, crop_fraction=crop_fraction, global_batch=global_batch,
                      process_index=process_index, process_count=process_count, num_local_devices=num_local_devices)
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.eval_batches(FileImages(files, labelled=True), subset,
                                      options=grain.Options.from_spec(self.spec), **kwargs)
        from moco_jax.data.pipelines import tfdata
        return tfdata.eval_batches(files.path_array(), np.asarray(files.labels), subset=subset,
                                   skip_corrupt=self.spec.skip_corrupt_images, num_threads=self.spec.num_threads,
                                   **kwargs)

    def _center_crops(self, files: FileTable, indices: np.ndarray, size, crop_fraction):
        """The evaluation view of files[indices] (int (M,)): (uint8 (M', size,
        size, 3), int64 (M',) positions in `indices` of the decoded ones)."""
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.center_crops(FileImages(files), indices, size, crop_fraction=crop_fraction,
                                      options=grain.Options.from_spec(self.spec))
        from moco_jax.data.pipelines import tfdata
        return tfdata.center_crops(files.path_array()[indices], size, crop_fraction=crop_fraction,
                                   skip_corrupt=self.spec.skip_corrupt_images, num_threads=self.spec.num_threads)


def _check_eval_split(spec: SourceConfig) -> None:
    if not spec.eval_split:
        raise ConfigError("the kNN monitor and the linear probe need labelled eval images: set "
                          "--config.eval_split to a sub-folder of data_dir (e.g. 'val')")


def _to_train_labels(train: FileTable, other: FileTable) -> np.ndarray:
    """int32 (len(other.folder_classes),): the label in `train` of each class
    of `other`, matched by folder name.

    Raises:
      InputError: `train` has no class folders, `other` has images outside
        class folders or classes that `train` lacks.
    """
    unknown = sorted(set(other.folder_classes) - set(train.folder_classes))
    if not train.folder_classes or unknown or other.num_unlabelled:
        raise InputError(
            f"labelled images need class folders in both {train.root} and {other.root}, with the same "
            f"names (eval classes missing from train: {unknown[:5]})")
    position = {c: i for i, c in enumerate(train.folder_classes)}
    return np.asarray([position[c] for c in other.folder_classes], np.int32)


def describe_loader(loader: str, spec: SourceConfig) -> str:
    """For the start-up log: which pipeline decodes, with how many workers
    and threads, and where those counts come from."""
    return host_resources.describe_parallelism(loader, spec)


def current_process() -> int:
    """jax.process_index() where jax is already imported (a training or
    evaluation program), else 0: the data layer imports no jax."""
    jax = sys.modules.get("jax")
    return int(jax.process_index()) if jax is not None else 0


def open_source(spec: SourceConfig, index_fallback: str = "", process_index: Optional[int] = None
                ) -> ImageFolderSource:
    """index_fallback: where the folder's index files go when data_dir is not
    writable and no index_dir is set (the trainer's workdir/data_index).
    process_index: this process (None: jax's, if jax is imported, else 0)."""
    return ImageFolderSource(spec, index_fallback, process_index)
