"""Any tensorflow-datasets image dataset by name, through tf.data.

`--config.dataset=cifar10` (or `tfds:cifar10`, `stl10`, `imagenette/320px-v2`,
`imagenet2012`, ...) with `--config.data_dir` the TFDS data directory ('' =
TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets), `train_split` for
pretraining (e.g. 'unlabelled' for stl10), `knn_train_split` / `eval_split`
for the kNN monitor. Datasets are never downloaded behind the user's back:
an unprepared one raises one `DatasetNotPreparedError`, when the source is
opened, that says where it looked and how to prepare it (or set
`tfds_download=True`).

Order: each process reads its own `tfds.split_for_jax_process` slice. Epoch e
reads the files in an order shuffled by (seed, process, e), then through a
shuffle buffer seeded the same way, so the stream is deterministic for a
seed; a run resumed at step s rebuilds epoch s // steps_per_epoch and skips
the records of the steps already done (before decoding them).
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from moco_jax.core.errors import ConfigError, InputError, NotFoundError
from moco_jax.data import tf_images
from moco_jax.data.source import ArrayDataset, Source, SourceConfig, check_decode_size, check_stream, steps_per_epoch

tf = tf_images.tf


class DatasetNotPreparedError(NotFoundError):
    """A tensorflow-datasets dataset with no prepared data in data_dir."""


def dataset_name(dataset: str) -> str:
    """A dataset name without an optional 'tfds:' prefix."""
    return dataset.removeprefix("tfds:")


def _default_data_dir_hint() -> str:
    return "TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)"


def _not_prepared(builder, name: str, data_dir) -> DatasetNotPreparedError:
    where = data_dir or _default_data_dir_hint()
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    how = f"tfds build {name} --data_dir={data_dir or '<DIR>'}"
    if manual:
        how += (" --manual_dir=<DIR WITH THE MANUAL DOWNLOAD> (this dataset needs a manual "
                f"download: {' '.join(manual.split())[:300]})")
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
            raise _not_prepared(builder, name, data_dir) from e
    return builder


def _as_dataset(builder, name, data_dir, **kwargs):
    """builder.as_dataset, with TFDS's missing-data assertion made readable."""
    try:
        return builder.as_dataset(**kwargs)
    except AssertionError:  # TFDS: "could not find data in ..."
        raise _not_prepared(builder, name, data_dir) from None
    except ValueError as e:  # TFDS: "Unknown split ..."
        raise ConfigError(f"{name}: split {kwargs.get('split')!r} cannot be read ({' '.join(str(e).split())}); "
                          f"its splits: {sorted(builder.info.splits)}") from None


def num_examples(builder, name, data_dir, split: str) -> int:
    """Examples in `split` (from the metadata, else the dataset's cardinality)."""
    try:
        n = builder.info.splits[split].num_examples
        if n:
            return int(n)
    except (KeyError, ValueError, TypeError):
        pass
    n = int(_as_dataset(builder, name, data_dir, split=split).cardinality())
    if n < 0:
        raise InputError(f"{name}[{split}] has an unknown number of examples")
    return n


class TfdsSource(Source):
    """A prepared tensorflow-datasets dataset: `train_split` for pretraining
    (two host crops per image), `train_split` (or another) and `eval_split`
    as the labelled arrays."""

    host_cropped = True

    def __init__(self, spec: SourceConfig):
        self.spec = spec
        self.name = dataset_name(spec.dataset)
        self._data_dir = spec.data_dir or None
        tf_images.configure(spec.num_threads)
        self.builder = prepared_builder(self.name, self._data_dir, spec.tfds_download)
        if spec.image_key not in self.builder.info.features:
            raise ConfigError(f"image_key={spec.image_key!r}: {self.name} has no such feature "
                              f"(its features: {list(self.builder.info.features)})")
        self._num_train = num_examples(self.builder, self.name, self._data_dir, spec.train_split)
        logging.info("tfds %s[%s] in %s: %d examples", self.name, spec.train_split, self.builder.data_dir,
                     self._num_train)

    @property
    def num_train_examples(self) -> int:
        return self._num_train

    def train_batches(self, *, global_batch, seed, start_step=0, process_index=0, process_count=1,
                      num_local_devices=1, crop_size=0, crop_scale=(0.08, 1.0)) -> Iterator[np.ndarray]:
        spec = self.spec
        return two_crop_batches(
            self.builder, self.name, self._data_dir, spec.train_split, self._num_train,
            global_batch=global_batch, seed=seed, crop_size=crop_size, crop_scale=tuple(crop_scale),
            start_step=start_step, process_index=process_index, process_count=process_count,
            num_local_devices=num_local_devices, shuffle_buffer=spec.shuffle_buffer,
            image_key=spec.image_key, num_threads=spec.num_threads)

    def labelled_arrays(self, *, size, crop_fraction=1.0, max_train_images=0, seed=0,
                        train_split="") -> ArrayDataset:
        """Train: the first `max_train_images` (0 = all) examples of the split in
        file order (TFDS shuffles examples when preparing; `seed` is unused);
        eval: all of eval_split. Both centre-cropped to `size`."""
        check_decode_size(self.name, size)
        del seed
        spec = self.spec
        label_key = spec.label_key
        if label_key not in self.builder.info.features:
            raise ConfigError(f"label_key={label_key!r}: {self.name} has no such feature for labelled images "
                             f"(features: {list(self.builder.info.features)})")
        kwargs = dict(size=size, crop_fraction=crop_fraction, image_key=spec.image_key, label_key=label_key,
                      num_threads=spec.num_threads)
        x_train, y_train = _center_crop_arrays(self.builder, self.name, self._data_dir,
                                               train_split or spec.train_split, cap=max_train_images, **kwargs)
        x_test, y_test = _center_crop_arrays(self.builder, self.name, self._data_dir, spec.eval_split, cap=0,
                                             **kwargs)
        return ArrayDataset(x_train, y_train, x_test, y_test,
                            num_classes=self.builder.info.features[label_key].num_classes, name=self.name)


def open_source(spec: SourceConfig) -> TfdsSource:
    return TfdsSource(spec)


def two_crop_batches(builder, name: str, data_dir, split: str, total: int, *,
                     global_batch: int, seed: int, crop_size: int, crop_scale,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     num_local_devices: int = 1, shuffle_buffer: int = 10_000,
                     image_key: str = "image", num_threads: int = 2) -> Iterator[np.ndarray]:
    """Infinite stream of two RandomResizedCrops of each image, per step.

    Every process runs the same number of steps per epoch,
    total // global_batch, from its own slice of the split.
    Yields:
      uint8 (num_local_devices, per_device, 2, crop_size, crop_size, 3).
    """
    local = check_stream(global_batch, start_step, process_index, process_count, num_local_devices)
    spe = steps_per_epoch(total, global_batch)
    process_split = tfds.split_for_jax_process(split, process_index=process_index,
                                               process_count=process_count)
    options = tf_images.pipeline_options(num_threads)

    def epoch_batches(epoch: int, skip_steps: int):
        shuffle_seed = tf_images.mix_seeds(seed, process_index, epoch) % (2**31 - 1)
        ds = _as_dataset(
            builder, name, data_dir, split=process_split, shuffle_files=True,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, options=options,
                                        try_autocache=False))

        def crops(position, encoded):
            example_seed = tf_images.example_seed(position, seed, process_index, epoch)
            return tf_images.two_crops(encoded, example_seed, crop_size, crop_scale)

        ds = (ds.map(lambda ex: ex[image_key])
              .shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
              .take(spe * local)
              .skip(skip_steps * local)  # resume: drop the records, undecoded
              .enumerate(start=skip_steps * local)
              .map(crops, num_parallel_calls=num_threads, deterministic=True)
              .batch(local, drop_remainder=True)
              .prefetch(2)
              .with_options(options))
        return ds.as_numpy_iterator()

    def steps():
        epoch, skip = divmod(start_step, spe)
        for e in itertools.count(epoch):
            yield from epoch_batches(e, skip if e == epoch else 0)

    return (b.reshape(num_local_devices, local // num_local_devices, *b.shape[1:]) for b in steps())


# --------------------------------------------------------------------------
# Labelled arrays.
# --------------------------------------------------------------------------
def _center_crop_arrays(builder, name, data_dir, split, *, size, crop_fraction, cap,
                        image_key, label_key, num_threads) -> tuple[np.ndarray, np.ndarray]:
    """The first `cap` (0 = all) examples of split, centre-cropped:
    (uint8 (M, size, size, 3), int32 (M,))."""
    ds = _as_dataset(builder, name, data_dir, split=split, shuffle_files=False,
                     decoders={image_key: tfds.decode.SkipDecoding()},
                     read_config=tfds.ReadConfig(options=tf_images.pipeline_options(num_threads),
                                                 try_autocache=False))
    if cap > 0:
        ds = ds.take(cap)
    ds = (ds.map(lambda ex: (tf_images.center_crop(ex[image_key], size, crop_fraction),
                             tf.cast(ex[label_key], tf.int32)),
                 num_parallel_calls=num_threads, deterministic=True)
          .batch(512)
          .prefetch(1))
    images, labels = [], []
    for x, y in ds.as_numpy_iterator():
        images.append(x)
        labels.append(y)
    if not images:
        raise InputError(f"{name}[{split}] is empty")
    return np.concatenate(images), np.concatenate(labels)
