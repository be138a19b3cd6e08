"""The tf.data input pipeline (`data_loader='tf'`; imports TensorFlow):
pretraining steps (`two_crop_batches`, optionally with each image's label),
labelled steps (`labelled_batches`: one crop per image, with its label), the
evaluation stream (`eval_batches`: the evaluation view with labels, in
order, padded to whole steps) and labelled arrays (`center_crops`) from what
a source hands it, each image decoded and cropped by `tf_ops`:

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
  epoch, position in the epoch). Its labelled steps follow the same order
  (over the split's first max_images examples when capped), not
  `local_batch_indices`: a split is read sequentially. Its evaluation stream
  is the split in file order (the first max_images when capped), each
  process keeping its positions of each step before decoding them.

The evaluation stream of file paths follows `source.eval_positions` over the
examples it is given; an undecodable image raises an error naming it, or
with `skip_corrupt` is logged and marked not valid.
"""
from __future__ import annotations

import collections
import itertools
from typing import Iterator, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import tensorflow_datasets as tfds

from moco_jax.core.errors import ConfigError, InputError
from moco_jax.data.pipelines import tf_ops, undecodable
from moco_jax.data.source import (UndecodableImageError, check_stream, eval_positions, local_batch_indices,
                                  num_eval_steps, steps_per_epoch)

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
# Training: random host crops of each image (two, or one with its label).
# --------------------------------------------------------------------------
def two_crop_batches(images: Images, *, global_batch: int, seed: int, crop_size: int, crop_scale,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     num_local_devices: int = 1, skip_corrupt: bool = False, num_threads: int = 2,
                     shuffle_buffer: int = 10_000, labels=None) -> Iterator:
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
      labels: to yield each image's label with its crops: for file paths
        their int32 (N,) labels, for a split True (its label_key, read with
        the image); None (or False): crops only. The crops are the same either way.
    Yields:
      uint8 (num_local_devices, per_device, 2, crop_size, crop_size, 3); with
      `labels`, (those crops, int32 (num_local_devices, per_device)), a skipped
      file's slot holding the crops and label of the file that fills it.
    Raises (eagerly): ConfigError/ValueError for bad batch divisibility; while
      iterating, UndecodableImageError naming the file unless skip_corrupt.
    """
    local = check_stream(global_batch, start_step, process_index, process_count, num_local_devices)
    spe = steps_per_epoch(len(images), global_batch)
    labelled = labels is not None and labels is not False
    kwargs = dict(local=local, seed=seed, crop_size=crop_size, crop_scale=crop_scale, start_step=start_step,
                  process_index=process_index, process_count=process_count, num_threads=num_threads)
    if isinstance(images, Split):
        steps = _split_steps(images, images.split, spe=spe, shuffle_buffer=shuffle_buffer, labelled=labelled,
                             **kwargs)
    else:
        if labelled and np.shape(labels) != (len(images),):
            raise ValueError(f"labels must be ({len(images)},), one per file, got shape {np.shape(labels)}")
        steps = _file_steps(np.asarray(images), global_batch=global_batch, num_local_devices=num_local_devices,
                            skip_corrupt=skip_corrupt, labels=np.asarray(labels, np.int32) if labelled else None,
                            **kwargs)
    if labelled:
        return (_per_device(crops, y, n=num_local_devices) for crops, y in steps)
    return (_per_device(crops, n=num_local_devices)[0] for crops, in steps)


def labelled_batches(images: Images, labels: Optional[np.ndarray], *, global_batch: int, seed: int, crop_size: int,
                     crop_scale, subset=None, cap: int = 0, start_step: int = 0, process_index: int = 0,
                     process_count: int = 1, num_local_devices: int = 1, skip_corrupt: bool = False,
                     num_threads: int = 2, shuffle_buffer: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Infinite stream of this process's share of each step: one
    RandomResizedCrop of each image (seeded as `two_crop_batches` seeds its
    crops, no flip) and its label, from global step `start_step`.

    Args:
      images, labels: file paths (str (N,)) and their int32 (N,) labels, read
        in the order of `local_batch_indices` over the examples `subset` (int
        (M,) indices into the paths; None: all), position i being example
        subset[i]; or a `Split` (labels None: its label_key), its first `cap`
        examples (0: all) in the order of its pretraining stream (see the
        module's docstring).
      skip_corrupt: file paths: log and fill undecodable files instead of
        raising.
    Yields:
      (uint8 (num_local_devices, per_device, crop_size, crop_size, 3),
      int32 (num_local_devices, per_device)).
    Raises (eagerly): ConfigError/ValueError for bad batch divisibility.
    """
    local = check_stream(global_batch, start_step, process_index, process_count, num_local_devices)
    kwargs = dict(local=local, seed=seed, crop_size=crop_size, crop_scale=crop_scale, start_step=start_step,
                  process_index=process_index, process_count=process_count, num_threads=num_threads, views=1)
    if isinstance(images, Split):
        split, size = _capped(images, cap)
        steps = _split_steps(images, split, spe=steps_per_epoch(size, global_batch), shuffle_buffer=shuffle_buffer,
                             labelled=True, **kwargs)
    else:
        steps = _file_steps(np.asarray(images), global_batch=global_batch, num_local_devices=num_local_devices,
                            skip_corrupt=skip_corrupt, labels=np.asarray(labels, np.int32), subset=subset, **kwargs)
    return (_per_device(crops[:, 0], y, n=num_local_devices) for crops, y in steps)


def _per_device(*arrays: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Each (local, ...) array as (n, local // n, ...)."""
    return tuple(a.reshape(n, -1, *a.shape[1:]) for a in arrays)


def _capped(split: Split, cap: int) -> tuple[str, int]:
    """The split string of the first `cap` examples of `split` (0: all), and
    how many examples it holds."""
    n = len(split) or count(split)
    if cap <= 0 or cap >= n:
        return split.split, n
    if "[" in split.split:
        raise ConfigError(f"{split.name}: cannot take the first {cap} examples of the sliced split "
                          f"{split.split!r} through tf.data; slice it there instead (e.g. 'train[:{cap}]')")
    return f"{split.split}[:{cap}]", cap


def _file_steps(paths: np.ndarray, *, global_batch, local, seed, crop_size, crop_scale, start_step, process_index,
                process_count, num_local_devices, skip_corrupt, num_threads, views: int = 2,
                labels: Optional[np.ndarray] = None, subset=None) -> Iterator[tuple[np.ndarray, ...]]:
    """The steps of file paths, in the order of `local_batch_indices` over
    `subset` (int (M,) indices into paths; None: all): (uint8 (local, views,
    S, S, 3),) each, or with `labels` (int32 (N,)) (crops, int32 (local,))."""
    subset = np.arange(len(paths)) if subset is None else np.asarray(subset, np.int64)

    def order():
        return (subset[i] for i in local_batch_indices(len(subset), global_batch, seed, start_step, process_index,
                                                        process_count, num_local_devices))

    # A second, identical stream tells the Python side which file sat at each
    # position, to name the ones that fail.
    indices, expected = order(), order()  # (each validates the stream now)
    configure(num_threads)
    path_table = tf.constant(paths)
    label_table = None if labels is None else tf.constant(labels)

    def load(position, index):
        encoded = tf.io.read_file(tf.gather(path_table, index))
        crops = tf_ops.random_crops(encoded, tf_ops.example_seed(position, seed, process_index),
                                    crop_size, crop_scale, views)
        if label_table is None:
            return position, crops
        return position, crops, tf.gather(label_table, index)

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
    specs = [((views, crop_size, crop_size, 3), np.uint8)] + ([((), np.int32)] if labels is not None else [])
    return _aligned_steps(ds.as_numpy_iterator(), expected, start_step, local, paths, skip_corrupt,
                          lambda p: _decode_error(p, crop_size, crop_scale), specs)


def _split_steps(split: Split, split_name: str, *, spe, local, seed, crop_size, crop_scale, start_step,
                 process_index, process_count, shuffle_buffer, num_threads, views: int = 2,
                 labelled: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
    """The steps of `split_name` (`split`'s records, or a slice of them),
    epoch after epoch: (uint8 (local, views, S, S, 3),) each, or with
    `labelled` (crops, int32 (local,)) (its label_key)."""
    process_split = tfds.split_for_jax_process(split_name, process_index=process_index,
                                               process_count=process_count)
    options = pipeline_options(num_threads)
    image_key, label_key = split.image_key, split.label_key

    def epoch_batches(epoch: int, skip_steps: int):
        shuffle_seed = tf_ops.mix_seeds(seed, process_index, epoch) % (2**31 - 1)
        ds = split.as_dataset(
            split=process_split, shuffle_files=True,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, options=options,
                                        try_autocache=False))

        def crops(position, example):
            example_seed = tf_ops.example_seed(position, seed, process_index, epoch)
            return (tf_ops.random_crops(example[0], example_seed, crop_size, crop_scale, views),) + example[1:]

        def fields(ex):
            return (ex[image_key], tf.cast(ex[label_key], tf.int32)) if labelled else (ex[image_key],)

        ds = (ds.map(fields)
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
            for batch in epoch_batches(e, skip if e == epoch else 0):
                yield batch if isinstance(batch, tuple) else (batch,)

    return steps()


def _decode_error(path: str, crop_size: int, crop_scale) -> str:
    """Why TensorFlow cannot load `path` (reproduced eagerly, outside tf.data)."""
    try:
        tf_ops.two_crops(tf.io.read_file(path), tf.constant([0, 0], tf.int64), crop_size, crop_scale)
    except Exception as e:  # noqa: BLE001 - any TF error is the reason we report
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return "it failed inside the pipeline but decodes on its own (transient read error?)"


def _aligned_steps(chunks, expected: Iterator[np.ndarray], step: int, local: int, paths: np.ndarray,
                   skip_corrupt: bool, explain, specs) -> Iterator[tuple[np.ndarray, ...]]:
    """Re-cut the stream of surviving (positions, *arrays) chunks into steps
    (`_recut`).

    Elements that failed to decode are missing from `chunks`; each missing
    position either raises (naming the file) or, with skip_corrupt, is logged,
    counted and filled (every array) with a copy of another example of the
    same step. Yields the arrays of each step, (local, ...) each.
    """
    skipped = 0
    for (ok, arrays), step_indices in zip(_recut(chunks, local, step, specs), expected):
        if not ok.all():
            for j in np.flatnonzero(~ok):
                path = paths[step_indices[j]]
                if not skip_corrupt:
                    raise undecodable.error(f"file {path}", explain(path))
                skipped += 1
                undecodable.log_skipped(path, skipped)
            if not ok.any():
                raise UndecodableImageError(
                    f"no image of step {step} could be decoded, e.g. {paths[step_indices[0]]}")
            for a in arrays:
                undecodable.fill_gaps(a, ok)
        step += 1
        yield arrays


def _recut(chunks, local: int, start_step: int, specs) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """Re-cut chunks (positions int (k,), *arrays (k, ...)), positions
    increasing with gaps where elements failed, into the steps of `local`
    positions each from step `start_step` on (step s: positions [s * local,
    (s + 1) * local)).

    Args:
      specs: [(shape, dtype)] of one element of each array, for the steps
        that must be assembled.
    Yields, endlessly (after the chunks end, steps with nothing):
      (ok bool (local,): which positions arrived, the arrays (local, ...),
      zeros where none arrived).
    """
    pending = collections.deque()  # chunks not yet used up
    for step in itertools.count(start_step):
        first, end = step * local, (step + 1) * local
        head = _take(pending, chunks)
        if head is not None and len(head[0]) == local and head[0][0] == first and head[0][-1] == end - 1:
            pending.popleft()  # the usual, gap-free case: no copy
            yield np.ones(local, bool), tuple(head[1:])
            continue
        ok, arrays = np.zeros(local, bool), tuple(np.zeros((local, *shape), dtype) for shape, dtype in specs)
        while (head := _take(pending, chunks)) is not None:  # this step's elements, from one or more chunks
            positions, *values = head
            n = int(np.searchsorted(positions, end))
            for a, v in zip(arrays, values):
                a[positions[:n] - first] = v[:n]
            ok[positions[:n] - first] = True
            if n < len(positions):
                pending[0] = (positions[n:], *(v[n:] for v in values))
                break
            pending.popleft()
        yield ok, arrays


def _take(pending: collections.deque, chunks):
    """The first pending chunk, fetching the next one if none is pending;
    None when the chunks are used up."""
    if not pending:
        chunk = next(chunks, None)
        if chunk is None:
            return None
        pending.append(chunk)
    return pending[0]


# --------------------------------------------------------------------------
# Evaluation: the centre crops of each image with its label, in order.
# --------------------------------------------------------------------------
def eval_batches(images: Images, labels: Optional[np.ndarray], *, size: int, crop_fraction: float,
                 global_batch: int, subset=None, cap: int = 0, process_index: int = 0, process_count: int = 1,
                 num_local_devices: int = 1, skip_corrupt: bool = False,
                 num_threads: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's share of each evaluation step: `num_eval_steps(M,
    global_batch)` steps, step s the positions `source.eval_positions(
    global_batch, s, process_index, process_count)`, each image's evaluation
    view (`tf_ops.center_crop`) with its label.

    Args:
      images, labels: file paths (str (N,)) and their int32 (N,) labels, over
        the examples `subset` (int (M,) indices into the paths; None: all),
        position i being example subset[i]; or a `Split` (labels None: its
        label_key), its first `cap` examples (0: all) in file order (each
        process reads them all, keeping its own before decoding).
      skip_corrupt: log undecodable images and mark them not valid instead of
        raising.
    Yields:
      (uint8 (num_local_devices, per_device, size, size, 3), int32 and bool
      (num_local_devices, per_device)): images, labels, valid (False for the
      padding past M and skipped images: zeros, label 0).
    Raises: ConfigError/ValueError (eagerly) for bad batch divisibility;
      UndecodableImageError naming an undecodable image unless skip_corrupt.
    """
    local = check_stream(global_batch, 0, process_index, process_count, num_local_devices)
    kwargs = dict(size=size, crop_fraction=crop_fraction, global_batch=global_batch, local=local,
                  process_index=process_index, skip_corrupt=skip_corrupt, num_threads=num_threads)
    if isinstance(images, Split):
        n = len(images) or count(images)
        n = min(cap, n) if cap > 0 else n
        steps = _eval_steps(_split_eval_elements(images, n, **kwargs), n,
                            lambda i: f"{images.name}[{images.split}] example {i}", **kwargs)
    else:
        paths = np.asarray(images)
        subset = np.arange(len(paths)) if subset is None else np.asarray(subset, np.int64)
        steps = _eval_steps(_file_eval_elements(paths, np.asarray(labels, np.int32), subset, **kwargs),
                            len(subset), lambda i: f"file {paths[subset[i]]}", **kwargs,
                            explain=lambda i: _decode_error(paths[subset[i]], size, (1.0, 1.0)))
    return (_per_device(*step, n=num_local_devices) for step in steps)


def _local_slot(position, global_batch: int, local: int, process_index: int):
    """Where global evaluation position `position` (of this process) sits in
    this process's stream: step * local + its place in the step."""
    return position // global_batch * local + position % global_batch - process_index * local


def _file_eval_elements(paths, labels, subset, *, size, crop_fraction, global_batch, local, process_index,
                        num_threads, **_):
    """(slot, image, label) chunks of this process's examples of `subset`,
    undecodable ones left out (`_local_slot`)."""
    positions = np.arange(len(subset))
    mine = positions[(positions % global_batch) // local == process_index]
    configure(num_threads)
    path_table, label_table = tf.constant(paths), tf.constant(labels)

    def load(slot, index):
        encoded = tf.io.read_file(tf.gather(path_table, index))
        return slot, tf_ops.center_crop(encoded, size, crop_fraction), tf.gather(label_table, index)

    ds = (tf.data.Dataset.from_tensor_slices((_local_slot(mine, global_batch, local, process_index), subset[mine]))
          .map(load, num_parallel_calls=num_threads, deterministic=True)
          .ignore_errors()  # `_eval_steps` notices the gap
          .batch(local)
          .prefetch(2)
          .with_options(pipeline_options(num_threads)))
    return ds.as_numpy_iterator()


def _split_eval_elements(split: Split, num_examples: int, *, size, crop_fraction, global_batch, local,
                         process_index, num_threads, **_):
    """(slot, image, label) chunks of this process's examples among the first
    `num_examples` of `split`, in file order, undecodable ones left out
    (`_local_slot`)."""
    image_key, label_key = split.image_key, split.label_key
    ds = split.as_dataset(split=split.split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(options=pipeline_options(num_threads), try_autocache=False))

    def load(position, ex):
        return (_local_slot(position, global_batch, local, process_index),
                tf_ops.center_crop(ex[image_key], size, crop_fraction), tf.cast(ex[label_key], tf.int32))

    ds = (ds.take(num_examples)
          .enumerate()
          .filter(lambda position, ex: (position % global_batch) // local == process_index)  # before decoding
          .map(load, num_parallel_calls=num_threads, deterministic=True)
          .ignore_errors()
          .batch(local)
          .prefetch(2))
    return ds.as_numpy_iterator()


def _eval_steps(chunks, num_examples: int, describe, *, size, global_batch, local, process_index, skip_corrupt,
                explain=None, **_) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The `num_eval_steps(num_examples, global_batch)` steps of (slot, image,
    label) `chunks`: (uint8 (local, size, size, 3), int32 (local,), valid bool
    (local,)). A position below num_examples that did not arrive failed to
    decode: raise naming it (`describe(position)`, `explain(position)` why),
    or log it and leave it not valid."""
    steps = _recut(chunks, local, 0, [((size, size, 3), np.uint8), ((), np.int32)])
    for s, (ok, (images, labels)) in zip(range(num_eval_steps(num_examples, global_batch)), steps):
        positions = eval_positions(global_batch, s, process_index, global_batch // local)
        for position in positions[~ok & (positions < num_examples)]:
            if not skip_corrupt:
                why = explain(position) if explain else "TensorFlow cannot decode it"
                raise undecodable.error(describe(position), why)
            undecodable.log_skipped(describe(position))
        yield images, labels, ok


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
