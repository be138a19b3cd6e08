"""Any tensorflow-datasets image dataset by name.

`--config.dataset=cifar10` (or `tfds:cifar10`, `stl10`, `imagenette/320px-v2`,
`imagenet2012`, ...) with `--config.data_dir` the TFDS data directory ('' =
TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets), `train_split` for
pretraining (e.g. 'unlabelled' for stl10), `knn_train_split` / `eval_split`
for the kNN monitor. Datasets are never downloaded behind the user's back:
an unprepared one raises one `DatasetNotPreparedError`, when the source is
opened, that says where it looked and how to prepare it (or set
`tfds_download=True`).

Two readers, chosen by `choose_loader`:
* grain (the default), for datasets prepared in the ArrayRecord format:
  `tfds.data_source` reads examples by index without TensorFlow
  (`RecordImages`), and the order, crops and resumption are those of every
  random-access source (`moco_jax.data.pipelines.grain`). Prepare a dataset
  this way once, on any machine with TensorFlow:
    python -c "import tensorflow_datasets as tfds; tfds.builder('imagenet2012',
      data_dir='DIR', file_format='array_record').download_and_prepare()"
  or convert one prepared as TFRecord files, without TensorFlow:
    python -m moco_jax.convert_tfds --dataset_dir=DIR/imagenet2012/5.1.0 --out_data_dir=NEW_DIR
* tf.data (`TfdsSplit` through `moco_jax.data.pipelines.tfdata`,
  `data_loader='tf'`), which also reads TFRecord files; it needs TensorFlow.

Labelled images (`label_key`, a ClassLabel: the same classes in every
split) stream through the same reader, each process decoding only its share:
`labelled_train_batches` (one host RandomResizedCrop per image) and
`eval_batches` (the evaluation view, in order), or come as whole arrays
(`labelled_arrays`); `train_batches(labels=True)` reads each pretraining
record's label with its image, through either reader. A cap (max_images)
takes the fixed random subset `knn_subset(N, cap, seed)` through grain, the
first examples in file order through tf.data (which reads records
sequentially; TFDS shuffled them when preparing), and tf.data's labelled
train stream follows its pretraining order (`tfdata`), not
`local_batch_indices`.

Finding the prepared dataset (its builder, how it was prepared, the one
error that says how to prepare it) needs no TensorFlow either.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from moco_jax.core.errors import ConfigError, InputError, NotFoundError
from moco_jax.data.source import (ArrayDataset, Source, SourceConfig, check_decode_size, check_stream, choose_loader,
                                  has_module, knn_subset)

__all__ = ["DatasetNotPreparedError", "RecordImages", "TfdsSource", "TfdsSplit", "dataset_name", "open_source",
           "prepared_builder"]


# --------------------------------------------------------------------------
# Finding a prepared dataset (no TensorFlow).
# --------------------------------------------------------------------------
ARRAY_RECORD = "array_record"


class DatasetNotPreparedError(NotFoundError):
    """A tensorflow-datasets dataset with no prepared data in data_dir."""


def dataset_name(dataset: str) -> str:
    """A dataset name without an optional 'tfds:' prefix."""
    return dataset.removeprefix("tfds:")


def default_data_dir_hint() -> str:
    return "TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)"


def not_prepared(builder, name: str, data_dir) -> DatasetNotPreparedError:
    where = data_dir or default_data_dir_hint()
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    how = (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir or 'DIR'}', "
           f"file_format='{ARRAY_RECORD}').download_and_prepare()\"")
    if manual:
        how += (" (this dataset needs a manual download, placed in ~/tensorflow_datasets/downloads/manual: "
                f"{' '.join(manual.split())[:300]})")
    return DatasetNotPreparedError(
        f"tensorflow-datasets dataset {name!r} is not prepared: no data in {builder.data_dir} "
        f"(data_dir searched: {where}). Prepare it once, on a machine that can download it: "
        f"`{how}`, then pass that directory as --config.data_dir; or set "
        "--config.tfds_download=True to let the trainer download and prepare it.")


def prepared_builder(name: str, data_dir=None, download: bool = False):
    """The TFDS builder of `name`, checked to be usable.

    Raises:
      ValueError: `name` is neither one of ours nor a TFDS dataset.
      DatasetNotPreparedError: no prepared data in data_dir (and download is
        False, or downloading failed).
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        from moco_jax.data import SOURCES  # noqa: PLC0415 - the registry imports this module

        raise ConfigError(
            f"dataset={name!r} is not one of {sorted(SOURCES)} and not a "
            "tensorflow-datasets name (see tfds.list_builders())") from None
    if download:
        try:
            builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001 - any download failure means "not prepared"
            raise not_prepared(builder, name, data_dir) from e
    elif not builder.is_prepared() and not has_module("tensorflow"):
        # With TensorFlow, tf.data says so when it reads (and tfds.testing.
        # mock_data serves unprepared datasets there).
        raise not_prepared(builder, name, data_dir)
    return builder


def file_format(builder) -> str:
    """'array_record', 'tfrecord', ...: how the dataset was prepared."""
    fmt = builder.info.file_format
    return getattr(fmt, "value", fmt) or "tfrecord"


# --------------------------------------------------------------------------
# What the pipelines read.
# --------------------------------------------------------------------------
def num_examples(builder, name, data_dir, split: str, loader: str) -> int:
    """Examples in `split` (from the metadata, else counted by the reader)."""
    try:
        n = builder.info.splits[split].num_examples
        if n:
            return int(n)
    except (KeyError, ValueError, TypeError):
        pass
    if loader == "grain":
        return len(_data_source(name, data_dir, split, ""))
    from moco_jax.data.pipelines import tfdata
    return tfdata.count(TfdsSplit(builder, name, data_dir, split))


@functools.lru_cache(maxsize=8)
def _data_source(name: str, data_dir, split: str, image_key: str):
    """`tfds.data_source` of one split, the image left encoded (bytes); one per
    process (grain workers open their own)."""
    decoders = {image_key: tfds.decode.SkipDecoding()} if image_key else None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
    except ValueError as e:  # TFDS: "Unknown split ..."
        raise ConfigError(f"{name}: split {split!r} cannot be read ({' '.join(str(e).split())})") from None


@dataclasses.dataclass(frozen=True)
class RecordImages:
    """The encoded images of `split` as the grain pipeline reads them
    (`grain.EncodedImages`: by index); pickles as its fields (grain workers
    open the files themselves)."""

    name: str
    data_dir: str | None
    split: str
    image_key: str
    size: int
    label_key: str = ""  # what `read_labelled` reads ('': unlabelled)

    def __len__(self) -> int:
        return self.size

    def read(self, index: int) -> bytes:
        return _data_source(self.name, self.data_dir, self.split, self.image_key)[index][self.image_key]

    def read_labelled(self, index: int) -> tuple[bytes, int]:
        """The image and label_key of one record, read once."""
        record = _data_source(self.name, self.data_dir, self.split, self.image_key)[index]
        return record[self.image_key], int(record[self.label_key])

    def describe(self, index: int) -> str:
        return f"{self.name}[{self.split}] example {index} (in {self.data_dir or default_data_dir_hint()})"

    def labels(self, indices: np.ndarray, label_key: str) -> np.ndarray:
        """int32 labels of `indices`."""
        source = _data_source(self.name, self.data_dir, self.split, self.image_key)
        return np.asarray([source[int(i)][label_key] for i in indices], np.int32)


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """`split` as the tf.data pipeline reads it (`tfdata.Split`): the
    builder's records in file order."""

    builder: Any
    name: str
    data_dir: str | None
    split: str
    size: int = 0  # examples (0: not known, or not needed)
    image_key: str = "image"
    label_key: str = "label"

    def __len__(self) -> int:
        return self.size

    def as_dataset(self, **kwargs):
        """builder.as_dataset, with TFDS's missing-data assertion made readable."""
        try:
            return self.builder.as_dataset(**kwargs)
        except AssertionError:  # TFDS: "could not find data in ..."
            raise not_prepared(self.builder, self.name, self.data_dir) from None
        except ValueError as e:  # TFDS: "Unknown split ..."
            raise ConfigError(f"{self.name}: split {kwargs.get('split')!r} cannot be read "
                              f"({' '.join(str(e).split())}); its splits: {sorted(self.builder.info.splits)}") from None


class TfdsSource(Source):
    """A prepared tensorflow-datasets dataset: `train_split` for pretraining
    (two host crops per image), `train_split` (or another) and `eval_split`
    as the labelled arrays."""

    host_cropped = True

    def __init__(self, spec: SourceConfig):
        self.spec = spec
        self.name = dataset_name(spec.dataset)
        self._data_dir = spec.data_dir or None
        self.builder = prepared_builder(self.name, self._data_dir, spec.tfds_download)
        fmt = file_format(self.builder)
        if fmt == ARRAY_RECORD:
            self.loader = choose_loader(spec, grain_only=f"it is prepared as {fmt} files, which tf.data does not read")
        else:
            self.loader = choose_loader(spec, tf_only=(
                f"it is prepared as {fmt} files, which only tf.data reads; convert it once, without TensorFlow: "
                f"`python -m moco_jax.convert_tfds --dataset_dir={self.builder.data_dir} --out_data_dir=NEW_DIR`, "
                "then --config.data_dir=NEW_DIR"))
        if self.loader == "tf":
            from moco_jax.data.pipelines import tfdata
            tfdata.configure(spec.num_threads)
        if spec.image_key not in self.builder.info.features:
            raise ConfigError(f"image_key={spec.image_key!r}: {self.name} has no such feature "
                              f"(its features: {list(self.builder.info.features)})")
        self._num_train = num_examples(self.builder, self.name, self._data_dir, spec.train_split, self.loader)
        logging.info("tfds %s[%s] in %s (%s): %d examples, read by %s", self.name, spec.train_split,
                     self.builder.data_dir, fmt, self._num_train, self.loader)

    @property
    def num_train_examples(self) -> int:
        return self._num_train

    def _records(self, split: str, size: int = 0, label_key: str = "") -> RecordImages:
        size = size or num_examples(self.builder, self.name, self._data_dir, split, "grain")
        return RecordImages(self.name, self._data_dir, split, self.spec.image_key, size, label_key)

    def _split(self, split: str, size: int = 0) -> TfdsSplit:
        return TfdsSplit(self.builder, self.name, self._data_dir, split, size, self.spec.image_key,
                         self.spec.label_key)

    def train_batches(self, *, global_batch, seed, start_step=0, process_index=0, process_count=1,
                      num_local_devices=1, crop_size=0, crop_scale=(0.08, 1.0), labels=False) -> Iterator:
        """Two host crops per image, uint8 (n, b, 2, S, S, 3) (grain with
        resize_on_device: (slots, views), `grain.two_crop_batches`); with `labels`
        (crops, int32 (n, b)), each record's label_key, read with its image."""
        spec = self.spec
        label_key = self._label_key() if labels else ""
        kwargs = dict(global_batch=global_batch, seed=seed, crop_size=crop_size, crop_scale=tuple(crop_scale),
                      start_step=start_step, process_index=process_index, process_count=process_count,
                      num_local_devices=num_local_devices)
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.two_crop_batches(self._records(spec.train_split, self._num_train, label_key),
                                          options=grain.Options.from_spec(spec), labels=labels, **kwargs)
        from moco_jax.data.pipelines import tfdata
        return tfdata.two_crop_batches(self._split(spec.train_split, self._num_train), labels=labels or None,
                                       shuffle_buffer=spec.shuffle_buffer, num_threads=spec.num_threads, **kwargs)

    def num_classes(self) -> int:
        """The classes of label_key (a ClassLabel feature)."""
        return self.builder.info.features[self._label_key()].num_classes

    def _label_key(self) -> str:
        label_key = self.spec.label_key
        if label_key not in self.builder.info.features:
            raise ConfigError(f"label_key={label_key!r}: {self.name} has no such feature for labelled images "
                              f"(features: {list(self.builder.info.features)})")
        return label_key

    def _num_examples(self, split: str) -> int:
        if split == self.spec.train_split:
            return self._num_train
        return num_examples(self.builder, self.name, self._data_dir, split, self.loader)

    def num_labelled(self, split="", max_images=0, seed=0) -> int:
        """grain: the subset knn_subset(N, max_images, seed); tf.data: the first
        max_images examples (the same number)."""
        return len(knn_subset(self._num_examples(split or self.spec.train_split), max_images, seed))

    def labelled_train_batches(self, *, global_batch, seed, crop_size, crop_scale=(0.08, 1.0), start_step=0,
                               process_index=0, process_count=1, num_local_devices=1, split="",
                               max_images=0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """grain: the order of `local_batch_indices` over the capped subset;
        tf.data: the first max_images examples of the split, in the order of
        its pretraining stream (`tfdata`)."""
        spec, label_key = self.spec, self._label_key()
        split = split or spec.train_split
        n = self._num_examples(split)
        kwargs = dict(global_batch=global_batch, seed=seed, crop_size=crop_size, crop_scale=tuple(crop_scale),
                      start_step=start_step, process_index=process_index, process_count=process_count,
                      num_local_devices=num_local_devices)
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.labelled_batches(self._records(split, n, label_key), knn_subset(n, max_images, seed),
                                          options=grain.Options.from_spec(spec), **kwargs)
        from moco_jax.data.pipelines import tfdata
        return tfdata.labelled_batches(self._split(split, n), None, cap=max_images, num_threads=spec.num_threads,
                                       shuffle_buffer=spec.shuffle_buffer, **kwargs)

    def eval_batches(self, *, split, size, crop_fraction, global_batch, process_index=0, process_count=1,
                     num_local_devices=1, max_images=0, seed=0) -> Iterator[tuple[np.ndarray, ...]]:
        """grain: the capped subset knn_subset(N, max_images, seed); tf.data:
        the first max_images examples, in file order."""
        check_decode_size(self.name, size)
        check_stream(global_batch, 0, process_index, process_count, num_local_devices)
        spec, label_key = self.spec, self._label_key()
        split = split or spec.train_split
        n = self._num_examples(split)
        kwargs = dict(size=size, crop_fraction=crop_fraction, global_batch=global_batch,
                      process_index=process_index, process_count=process_count, num_local_devices=num_local_devices)
        if self.loader == "grain":
            from moco_jax.data.pipelines import grain
            return grain.eval_batches(self._records(split, n, label_key), knn_subset(n, max_images, seed),
                                      options=grain.Options.from_spec(spec), **kwargs)
        from moco_jax.data.pipelines import tfdata
        return tfdata.eval_batches(self._split(split, n), None, cap=max_images, num_threads=spec.num_threads,
                                   skip_corrupt=spec.skip_corrupt_images, **kwargs)

    def labelled_arrays(self, *, size, crop_fraction=1.0, max_train_images=0, seed=0,
                        train_split="") -> ArrayDataset:
        """Eval: all of eval_split; train: `max_train_images` (0 = all) of the
        split: grain takes the fixed random subset `knn_subset(N, cap, seed)`,
        tf.data the first ones in file order (TFDS shuffled the examples when
        preparing). Both centre-cropped to `size`."""
        check_decode_size(self.name, size)
        spec, label_key = self.spec, self._label_key()
        train_split = train_split or spec.train_split
        if self.loader == "grain":
            x_train, y_train = self._grain_arrays(train_split, size, crop_fraction, max_train_images, seed)
            x_test, y_test = self._grain_arrays(spec.eval_split, size, crop_fraction, 0, seed)
        else:
            from moco_jax.data.pipelines import tfdata
            kwargs = dict(crop_fraction=crop_fraction, num_threads=spec.num_threads)
            x_train, y_train = tfdata.center_crops(self._split(train_split), size, cap=max_train_images, **kwargs)
            x_test, y_test = tfdata.center_crops(self._split(spec.eval_split), size, cap=0, **kwargs)
        return ArrayDataset(x_train, y_train, x_test, y_test,
                            num_classes=self.builder.info.features[label_key].num_classes, name=self.name)

    def _grain_arrays(self, split, size, crop_fraction, cap, seed) -> tuple[np.ndarray, np.ndarray]:
        from moco_jax.data.pipelines import grain
        records = self._records(split)
        if not len(records):
            raise InputError(f"{self.name}[{split}] is empty")
        indices = knn_subset(len(records), cap, seed)
        images, kept = grain.center_crops(records, indices, size, crop_fraction=crop_fraction,
                                          options=grain.Options.from_spec(self.spec))
        return images, records.labels(indices[kept], self.spec.label_key)


def open_source(spec: SourceConfig) -> TfdsSource:
    return TfdsSource(spec)
