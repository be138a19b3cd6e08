"""Any tensorflow-datasets image dataset by name, through tf.data.

`--config.dataset=cifar10` (or `tfds:cifar10`, `stl10`, `imagenette/320px-v2`,
`imagenet2012`, ...) with `--config.data_dir` the TFDS data directory ('' =
TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets), `train_split` for
pretraining (e.g. 'unlabelled' for stl10), `knn_train_split` / `eval_split`
for the kNN monitor. Datasets are never downloaded behind the user's back:
an unprepared one raises one `DatasetNotPreparedError` that says where it
looked and how to prepare it (or set `tfds_download=True`).

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

from moco_jax import data, tf_images

tf = tf_images.tf


class DatasetNotPreparedError(FileNotFoundError):
    """A tensorflow-datasets dataset with no prepared data in data_dir."""


def dataset_name(config) -> str:
    """config.dataset without an optional 'tfds:' prefix."""
    return config.dataset.removeprefix("tfds:")


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
        raise ValueError(
            f"unknown dataset {name!r}: not one of the in-memory datasets "
            f"{sorted(data.ARRAY_DATASETS)}, not '{data.IMAGE_FOLDER}', and not a "
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
        raise ValueError(f"{name}[{split}] has an unknown number of examples")
    return n


def _image_key(config) -> str:
    return config.get("image_key", "image")


def _num_threads(config) -> int:
    return config.get("input_threads", 0) or tf_images.default_num_threads()


# --------------------------------------------------------------------------
# Pretraining.
# --------------------------------------------------------------------------
def count_train_examples(config) -> int:
    """Examples in config.train_split (all processes)."""
    name, data_dir = dataset_name(config), config.data_dir or None
    tf_images.configure(_num_threads(config))
    builder = prepared_builder(name, data_dir, config.get("tfds_download", False))
    return num_examples(builder, name, data_dir, config.get("train_split", "train"))


def make_pretrain_input(config, *, start_step: int, process_index: int,
                        process_count: int, num_local_devices: int) -> data.PretrainInput:
    """`data.make_pretrain_input` for a tensorflow-datasets name."""
    name, data_dir = dataset_name(config), config.data_dir or None
    num_threads = _num_threads(config)
    tf_images.configure(num_threads)
    builder = prepared_builder(name, data_dir, config.get("tfds_download", False))
    split = config.get("train_split", "train")
    total = num_examples(builder, name, data_dir, split)
    batches = two_crop_batches(
        builder, name, data_dir, split, total,
        global_batch=config.batch_size, seed=config.seed, crop_size=config.crop_size,
        crop_scale=tuple(config.crop_scale), start_step=start_step,
        process_index=process_index, process_count=process_count,
        num_local_devices=num_local_devices,
        shuffle_buffer=config.get("shuffle_buffer", 10_000),
        image_key=_image_key(config), num_threads=num_threads)
    logging.info("tfds %s[%s] in %s: %d examples", name, split, builder.data_dir, total)
    return data.PretrainInput(batches, total, data.steps_per_epoch(total, config.batch_size),
                              host_cropped=True)


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
    local = data.local_batch_size(global_batch, process_count, num_local_devices)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    spe = data.steps_per_epoch(total, global_batch)
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
# kNN monitor.
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
        raise ValueError(f"{name}[{split}] is empty")
    return np.concatenate(images), np.concatenate(labels)


def load_knn_arrays(config) -> data.ArrayDataset:
    """`data.load_knn_arrays` for a tensorflow-datasets name.

    Bank: the first knn_max_train_images (0 = all) examples of knn_train_split
    ('' = train_split) in file order (TFDS shuffles examples when preparing);
    queries: all of eval_split. Both centre-cropped to crop_size.
    """
    name, data_dir = dataset_name(config), config.data_dir or None
    num_threads = _num_threads(config)
    tf_images.configure(num_threads)
    builder = prepared_builder(name, data_dir, config.get("tfds_download", False))
    label_key = config.get("label_key", "label")
    if label_key not in builder.info.features:
        raise ValueError(f"{name} has no {label_key!r} feature for the kNN monitor "
                         f"(features: {list(builder.info.features)})")
    kwargs = dict(size=config.crop_size,
                  crop_fraction=config.get("knn_center_crop_fraction", 1.0),
                  image_key=_image_key(config), label_key=label_key, num_threads=num_threads)
    bank_split = config.get("knn_train_split", "") or config.get("train_split", "train")
    x_train, y_train = _center_crop_arrays(builder, name, data_dir, bank_split,
                                           cap=config.get("knn_max_train_images", 0), **kwargs)
    x_test, y_test = _center_crop_arrays(builder, name, data_dir,
                                         config.get("eval_split", "test"), cap=0, **kwargs)
    return data.ArrayDataset(x_train, y_train, x_test, y_test,
                             num_classes=builder.info.features[label_key].num_classes,
                             name=name)
