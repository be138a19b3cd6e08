"""tensorflow-datasets datasets through tf.data (`data_loader='tf'`): the only
way to read a dataset prepared as TFRecord files without converting it
(`python -m moco_jax.convert_tfds`). Imports TensorFlow.

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

from moco_jax.core.errors import ConfigError, InputError
from moco_jax.data import tf_images
from moco_jax.data.source import check_stream, steps_per_epoch
from moco_jax.data.tfds_builder import not_prepared

tf = tf_images.tf


def _as_dataset(builder, name, data_dir, **kwargs):
    """builder.as_dataset, with TFDS's missing-data assertion made readable."""
    try:
        return builder.as_dataset(**kwargs)
    except AssertionError:  # TFDS: "could not find data in ..."
        raise not_prepared(builder, name, data_dir) from None
    except ValueError as e:  # TFDS: "Unknown split ..."
        raise ConfigError(f"{name}: split {kwargs.get('split')!r} cannot be read ({' '.join(str(e).split())}); "
                          f"its splits: {sorted(builder.info.splits)}") from None


def cardinality(builder, name, data_dir, split: str) -> int:
    """Examples in `split`, counted by tf.data (metadata without split sizes)."""
    n = int(_as_dataset(builder, name, data_dir, split=split).cardinality())
    if n < 0:
        raise InputError(f"{name}[{split}] has an unknown number of examples")
    return n


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
def center_crop_arrays(builder, name, data_dir, split, *, size, crop_fraction, cap,
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
