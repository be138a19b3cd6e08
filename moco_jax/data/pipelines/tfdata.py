"""The tf.data input pipeline (`data_loader='tf'`; imports TensorFlow):
pretraining steps and labelled arrays from what a source hands it, each
image decoded and cropped by `tf_ops`:

* file paths (an image folder): read in the order of every source,
  `source.local_batch_indices`: deterministic for a seed, reshuffled each
  epoch, resumable at any step, a disjoint slice per process. One pipeline
  serves all epochs; numpy feeds it the indices of each step. The crops of
  an example are seeded by (seed, process, its position in the process's
  stream). An undecodable file stops the stream with an error naming it, or
  with `skip_corrupt` is logged and its slot filled (`undecodable`).
* a tensorflow-datasets split (`Split`; the only way to read a dataset
  prepared as TFRecord files without converting it, `python -m
  moco_jax.convert_tfds`): each process reads its own
  `tfds.split_for_jax_process` slice. Epoch e reads the files in an order
  shuffled by (seed, process, e), then through a shuffle buffer seeded the
  same way, so the stream is deterministic for a seed; a run resumed at step
  s rebuilds epoch s // steps_per_epoch and skips the records of the steps
  already done (before decoding them). Crops are seeded by (seed, process,
  epoch, position in the epoch).
"""
from __future__ import annotations

import collections
import itertools
from typing import Iterator, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import tensorflow_datasets as tfds

from moco_jax.core.errors import InputError
from moco_jax.data.pipelines import tf_ops, undecodable
from moco_jax.data.source import UndecodableImageError, check_stream, local_batch_indices, steps_per_epoch

tf = tf_ops.tf
_configured = False


@runtime_checkable
class Split(Protocol):
    """A tensorflow-datasets split as tf.data reads it (the TFDS source's
    `TfdsSplit`): the builder's records, which this pipeline reads with the
    image left encoded."""

    name: str
    split: str
    image_key: str
    label_key: str

    def __len__(self) -> int:
        """Examples in the split."""

    def as_dataset(self, **kwargs) -> tf.data.Dataset:
        """The builder's `as_dataset(**kwargs)`, its errors made readable."""


Images = Union[Sequence[str], np.ndarray, Split]  # file paths, or a split


def configure(num_threads: int) -> None:
    """Bound TensorFlow's own (eager) thread pool to `num_threads`, so the kNN
    decode does not take every core from JAX; the pipelines have private
    pools (`pipeline_options`). Only the first call counts, and only before
    TensorFlow's first op (it refuses changes after initialisation)."""
    global _configured
    if _configured:
        return
    _configured = True
    try:
        tf.config.threading.set_inter_op_parallelism_threads(num_threads)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:
        pass


def pipeline_options(num_threads: int) -> tf.data.Options:
    """tf.data options: a private pool of `num_threads` decode threads plus
    one for reading/batching (sharing one pool starves the decoders), one
    thread per op, deterministic order (a resumed run sees the same examples)."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = num_threads + 1
    options.threading.max_intra_op_parallelism = 1
    options.deterministic = True
    return options


def count(split: Split) -> int:
    """Examples in `split`, counted by tf.data (metadata without split sizes)."""
    n = int(split.as_dataset(split=split.split).cardinality())
    if n < 0:
        raise InputError(f"{split.name}[{split.split}] has an unknown number of examples")
    return n


# --------------------------------------------------------------------------
# Pretraining: two host crops per image.
# --------------------------------------------------------------------------
def two_crop_batches(images: Images, *, global_batch: int, seed: int, crop_size: int, crop_scale,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     num_local_devices: int = 1, skip_corrupt: bool = False, num_threads: int = 2,
                     shuffle_buffer: int = 10_000) -> Iterator[np.ndarray]:
    """Infinite stream of this process's share of each step: two independent
    RandomResizedCrops of each image, in the order of `images` (see the
    module's docstring), from global step `start_step`.

    Args:
      images: file paths (str (N,)), or a `Split` (every process runs the
        same number of steps per epoch, len(split) // global_batch, from
        its own slice of the split).
      skip_corrupt: file paths: log and fill undecodable files instead of
        raising.
      shuffle_buffer: a split: the examples shuffled together.
    Yields:
      uint8 (num_local_devices, per_device, 2, crop_size, crop_size, 3).
    Raises (eagerly): ConfigError/ValueError for bad batch divisibility; while
      iterating, UndecodableImageError naming the file unless skip_corrupt.
    """
    local = check_stream(global_batch, start_step, process_index, process_count, num_local_devices)
    spe = steps_per_epoch(len(images), global_batch)
    if isinstance(images, Split):
        steps = _split_steps(images, spe=spe, local=local, seed=seed, crop_size=crop_size, crop_scale=crop_scale,
                             start_step=start_step, process_index=process_index, process_count=process_count,
                             shuffle_buffer=shuffle_buffer, num_threads=num_threads)
    else:
        steps = _file_steps(np.asarray(images), global_batch=global_batch, local=local, seed=seed,
                            crop_size=crop_size, crop_scale=crop_scale, start_step=start_step,
                            process_index=process_index, process_count=process_count,
                            num_local_devices=num_local_devices, skip_corrupt=skip_corrupt, num_threads=num_threads)
    return (s.reshape(num_local_devices, local // num_local_devices, *s.shape[1:]) for s in steps)


def _file_steps(paths: np.ndarray, *, global_batch, local, seed, crop_size, crop_scale, start_step, process_index,
                process_count, num_local_devices, skip_corrupt, num_threads) -> Iterator[np.ndarray]:
    """The steps of file paths, in the order of `local_batch_indices`:
    uint8 (local, 2, S, S, 3) each."""
    indices = local_batch_indices(len(paths), global_batch, seed, start_step,
                                  process_index, process_count, num_local_devices)
    # A second, identical stream tells the Python side which file sat at each
    # position, to name the ones that fail.
    expected = local_batch_indices(len(paths), global_batch, seed, start_step,
                                   process_index, process_count, num_local_devices)
    configure(num_threads)
    path_table = tf.constant(paths)

    def load(position, index):
        encoded = tf.io.read_file(tf.gather(path_table, index))
        crops = tf_ops.two_crops(encoded, tf_ops.example_seed(position, seed, process_index),
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
          .with_options(pipeline_options(num_threads)))
    chunks = ds.as_numpy_iterator()
    return _aligned_steps(chunks, expected, start_step, local, paths,
                          skip_corrupt, lambda p: _decode_error(p, crop_size, crop_scale))


def _split_steps(split: Split, *, spe, local, seed, crop_size, crop_scale, start_step, process_index,
                 process_count, shuffle_buffer, num_threads) -> Iterator[np.ndarray]:
    """The steps of a split, epoch after epoch: uint8 (local, 2, S, S, 3) each."""
    process_split = tfds.split_for_jax_process(split.split, process_index=process_index,
                                               process_count=process_count)
    options = pipeline_options(num_threads)
    image_key = split.image_key

    def epoch_batches(epoch: int, skip_steps: int):
        shuffle_seed = tf_ops.mix_seeds(seed, process_index, epoch) % (2**31 - 1)
        ds = split.as_dataset(
            split=process_split, shuffle_files=True,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, options=options,
                                        try_autocache=False))

        def crops(position, encoded):
            example_seed = tf_ops.example_seed(position, seed, process_index, epoch)
            return tf_ops.two_crops(encoded, example_seed, crop_size, crop_scale)

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

    return steps()


def _decode_error(path: str, crop_size: int, crop_scale) -> str:
    """Why TensorFlow cannot load `path` (reproduced eagerly, outside tf.data)."""
    try:
        tf_ops.two_crops(tf.io.read_file(path), tf.constant([0, 0], tf.int64), crop_size, crop_scale)
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
                raise undecodable.error(f"file {path}", explain(path))
            skipped += 1
            undecodable.log_skipped(path, skipped)
        if not ok.any():
            raise UndecodableImageError(
                f"no image of step {step - 1} could be decoded, e.g. {paths[step_indices[0]]}")
        undecodable.fill_gaps(batch, ok)
        yield batch


def _take(pending: collections.deque, chunks):
    """The first pending chunk, fetching the next one if none is pending."""
    if not pending:
        positions, crops = next(chunks)
        pending.append((positions, crops))
    return pending[0]


# --------------------------------------------------------------------------
# Labelled arrays: centre crops.
# --------------------------------------------------------------------------
def center_crops(images: Images, size: int, *, crop_fraction: float = 1.0, skip_corrupt: bool = False,
                 num_threads: int = 2, cap: int = 0, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation view (`tf_ops.center_crop`: shorter side resized, then
    the central size x size window) of each image.

    Args:
      images: file paths (str (N,)): every file; or a `Split`: its first
        `cap` (0 = all) examples, in file order.
      skip_corrupt: file paths: log and leave out undecodable files instead
        of raising.
    Returns:
      (uint8 (M, size, size, 3), int (M,)): for file paths the int64 indices
      into `paths` of the M decoded files, in order (UndecodableImageError
      names the first undecodable file unless skip_corrupt); for a split the
      examples' int32 labels (`label_key`).
    """
    if isinstance(images, Split):
        return _split_center_crops(images, size, crop_fraction=crop_fraction, cap=cap, num_threads=num_threads)
    return _file_center_crops(np.asarray(images), size, crop_fraction=crop_fraction, skip_corrupt=skip_corrupt,
                              num_threads=num_threads, batch_size=batch_size)


def _file_center_crops(paths: np.ndarray, size, *, crop_fraction, skip_corrupt, num_threads,
                       batch_size) -> tuple[np.ndarray, np.ndarray]:
    configure(num_threads)
    path_table = tf.constant(paths)
    ds = (tf.data.Dataset.range(len(paths))
          .map(lambda i: (i, tf_ops.center_crop(tf.io.read_file(tf.gather(path_table, i)),
                                                size, crop_fraction)),
               num_parallel_calls=num_threads, deterministic=True)
          .ignore_errors()
          .batch(batch_size)
          .prefetch(1)
          .with_options(pipeline_options(num_threads)))
    kept, images = [], []
    for idx, imgs in ds.as_numpy_iterator():
        kept.append(idx)
        images.append(imgs)
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    missing = np.setdiff1d(np.arange(len(paths)), kept)
    if len(missing) and not skip_corrupt:
        raise undecodable.error(f"file {paths[missing[0]]}", _decode_error(paths[missing[0]], size, (1.0, 1.0)))
    for i in missing:
        undecodable.log_skipped(paths[i])
    images = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return images, kept


def _split_center_crops(split: Split, size, *, crop_fraction, cap, num_threads) -> tuple[np.ndarray, np.ndarray]:
    image_key, label_key = split.image_key, split.label_key
    ds = split.as_dataset(split=split.split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(options=pipeline_options(num_threads),
                                                      try_autocache=False))
    if cap > 0:
        ds = ds.take(cap)
    ds = (ds.map(lambda ex: (tf_ops.center_crop(ex[image_key], size, crop_fraction),
                             tf.cast(ex[label_key], tf.int32)),
                 num_parallel_calls=num_threads, deterministic=True)
          .batch(512)
          .prefetch(1))
    images, labels = [], []
    for x, y in ds.as_numpy_iterator():
        images.append(x)
        labels.append(y)
    if not images:
        raise InputError(f"{split.name}[{split.split}] is empty")
    return np.concatenate(images), np.concatenate(labels)
