"""What every data source is and shares: the `Source` interface, the options
it is opened with, in-memory labelled arrays, and the example order.

A `Source` is one dataset opened once from the config (`moco_jax.data.
open_source`). It knows how many examples its pretraining split holds, yields
this process's share of every global batch from any start step, and gives
the labelled images the kNN monitor and the linear probe use, either
streamed, each process decoding only its share (`labelled_train_batches`:
one random crop per image, in the pretraining order; `eval_batches`: the
evaluation view, in order, padded to whole steps), or as whole arrays in
host memory (`labelled_arrays`).

The order is the same for every source (`local_batch_indices`): epoch e is a
permutation seeded by (seed, e), global step s takes the next global batch of
it, process p its contiguous p-th share of that batch, and the last partial
batch of an epoch is dropped (MoCo enqueues whole batches). So any step can
be recomputed directly, on every process, and a resumed run reads exactly the
batches an uninterrupted one would.

The labelled streams run over a split's "capped subset": its examples
`knn_subset(N, max_images, seed)` (all when max_images is 0), position i
being the i-th of them. `labelled_train_batches` takes them in the order of
`local_batch_indices` over those M positions; `eval_batches` takes them in
order, `num_eval_steps(M, global_batch)` steps, step s covering positions
[s * global_batch, (s + 1) * global_batch) (`eval_positions`), the last
step padded (valid False) so that every process runs the same steps.

Shapes:
  images  uint8 (N, H, W, 3), labels int32 (N,)
  a host batch for pmap: uint8 (num_local_devices, per_device_batch, H, W, 3),
  or, host-cropped, (num_local_devices, per_device_batch, 2, S, S, 3), or
  (slots, views) for the device to cut and resize (grain, resize_on_device);
  `train_batches(labels=True)`: (that batch, labels int32 (num_local_devices,
  per_device_batch)), for an online linear probe
  labelled: images (num_local_devices, per_device_batch, S, S, 3) (in-memory:
  H, W), labels int32 and, for evaluation, valid bool (num_local_devices,
  per_device_batch)
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.util
import itertools
from typing import Iterator, Optional

import numpy as np

from moco_jax.core.config import BOOL, NAME, STRING, integer, one_of
from moco_jax.core.errors import ConfigError, InputError
from moco_jax.data.host_resources import cpus_owned


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """How to find and read a dataset: the data fields that the pretraining
    and the linear-evaluation configs both declare (see configs/default.py,
    `add_data_fields`, for what each one means).

    The defaults here serve configs that lack a field: the config of weights
    trained elsewhere, or one stored by an older version of moco_jax.
    """

    dataset: str
    data_dir: str = ""
    image_size: int = 0
    train_split: str = "train"
    eval_split: str = "test"
    skip_corrupt_images: bool = False
    input_threads: int = 0
    shuffle_buffer: int = 10_000
    tfds_download: bool = False
    image_key: str = "image"
    label_key: str = "label"
    data_loader: str = "auto"
    input_workers: int = -1
    index_dir: str = ""
    input_read_threads: int = 4
    resize_on_device: bool = False

    @property
    def num_threads(self) -> int:
        """tf.data decode threads: `input_threads`, or when 0 the CPUs this
        process owns but one (left to the JAX host thread), at least 1
        (`host_resources.cpu_share`: affinity, cgroup quota,
        SLURM_CPUS_PER_TASK, shared by the host's training processes)."""
        return self.input_threads or max(1, cpus_owned() - 1)

    @property
    def grain_workers(self) -> int:
        """grain worker processes: `input_workers`, or when -1 the CPUs this
        process owns (`host_resources.cpu_share`) but one if that makes at
        least 2, else none (one worker process delivers less than threads of
        the training process: BENCHMARKS.md; on 2 CPUs 2 threads beat 2
        workers' shipping). A pipeline may still start fewer where /dev/shm
        is too small for them (`host_resources.fit_shm`)."""
        if self.input_workers >= 0:
            return self.input_workers
        spare = cpus_owned() - 1
        return spare if spare >= 2 else 0

    @property
    def grain_threads(self) -> int:
        """Decode threads per grain worker, or of the training process without
        workers: `input_threads`, or when 0 one per worker (processes are what
        scales: Python holds the GIL for about a third of each image), one
        per CPU owned without workers (Pillow releases the GIL while it
        decodes and resizes)."""
        return self.input_threads or (1 if self.grain_workers else cpus_owned())

    @classmethod
    def from_config(cls, config) -> "SourceConfig":
        """The data fields of an experiment config."""
        given = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        return cls(**given)


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A labelled image dataset held fully in host memory.

    Attributes:
      train_images: uint8 (N_train, H, W, 3).
      train_labels: int32 (N_train,).
      test_images: uint8 (N_test, H, W, 3).
      test_labels: int32 (N_test,).
      num_classes: number of label values (labels lie in [0, num_classes)).
      name: short dataset name, e.g. 'digits'.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str


class UndecodableImageError(InputError):
    """An image file that cannot be decoded; the message names it."""


LOADERS = ("auto", "grain", "tf")  # config.data_loader
TF_INSTALL = "pip install tensorflow-cpu==2.21.0"

# The data fields of every config (configs/default.py `add_data_fields`), read by `SourceConfig`.
FIELDS = {
    "dataset": NAME, "data_dir": STRING, "image_size": integer(0), "train_split": STRING, "eval_split": STRING,
    "skip_corrupt_images": BOOL, "input_threads": integer(0), "shuffle_buffer": integer(1), "tfds_download": BOOL,
    "image_key": NAME, "label_key": NAME, "data_loader": one_of(LOADERS),
    "input_workers": integer(-1, note=" (-1: automatic, 0: no worker processes)"),
    "index_dir": STRING, "input_read_threads": integer(0), "resize_on_device": BOOL,
}


def has_module(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def choose_loader(spec: SourceConfig, tf_only: str = "", grain_only: str = "") -> str:
    """'grain' or 'tf': the pipeline that decodes the files of `spec`.

    auto is grain (no TensorFlow needed; at least tf.data's speed, see
    BENCHMARKS.md), unless `tf_only` says why only tf.data can read this
    dataset (a tensorflow-datasets dataset prepared as TFRecord files);
    `grain_only` says why tf.data cannot (one prepared as ArrayRecord files).
    Raises ConfigError when the chosen pipeline cannot read the dataset or
    its package is missing.
    """
    if spec.data_loader not in LOADERS:
        raise ConfigError(f"data_loader={spec.data_loader!r} must be one of {list(LOADERS)}")
    loader = spec.data_loader
    if loader == "auto":
        loader = "tf" if tf_only else "grain"
    why_not = {"grain": tf_only, "tf": grain_only}[loader]
    if why_not:
        raise ConfigError(f"data_loader={loader!r} cannot read {spec.dataset}: {why_not}")
    if loader == "tf" and not has_module("tensorflow"):
        why = f" ({tf_only})" if tf_only else "; data_loader='grain' reads it without TensorFlow"
        raise ConfigError(f"data_loader='tf' needs TensorFlow, which is not installed: `{TF_INSTALL}`{why}")
    if loader == "grain" and not has_module("grain"):
        raise ConfigError("data_loader='grain' needs grain: `pip install grain==0.2.18`")
    return loader


class Source(abc.ABC):
    """One dataset, opened once from a `SourceConfig`.

    Attributes:
      name: a short name for logs and reports.
      host_cropped: False: `train_batches` yields whole images, which the
        device crops (`augment.make_views_fn`); True: it yields two
        independent RandomResizedCrops of each image, boxes drawn on the
        host (cut and resized there, or, with `resize_on_device`, by the
        device from the decoded image the host sends).
      loader: what turns examples into batches: 'grain' or 'tf' for files
        (`choose_loader`), 'in-memory' for arrays. Each gives an order that is
        a function of (seed, step), but not the same function.
    """

    name: str
    host_cropped: bool
    loader: str = "in-memory"

    @property
    @abc.abstractmethod
    def num_train_examples(self) -> int:
        """Examples in the pretraining stream (all processes together)."""

    @abc.abstractmethod
    def train_batches(self, *, global_batch: int, seed: int, start_step: int = 0, process_index: int = 0,
                      process_count: int = 1, num_local_devices: int = 1, crop_size: int = 0,
                      crop_scale=(0.08, 1.0), labels: bool = False) -> Iterator:
        """Infinite stream of this process's share of each global batch, from
        global step `start_step`, in the order of `local_batch_indices`.

        crop_size, crop_scale: the host crops' side and area range (only
        sources with `host_cropped` use them).
        labels: also yield each example's label in the pretraining split (for
          an online linear probe); the batches are the same either way.
        Yields:
          batch uint8 (num_local_devices, per_device, H, W, 3), or with
          `host_cropped` (num_local_devices, per_device, 2, S, S, 3), or
          with `host_cropped` and resize_on_device (grain) the pair (slots
          uint8 (num_local_devices, per_device, P, 3), views int32
          (num_local_devices, per_device, 2, 4): `grain.two_crop_batches`); with
          `labels`, (batch, int32 (num_local_devices, per_device)), an image
          skipped as undecodable leaving the label of the one filling its slot.
        Raises (eagerly): ValueError for a batch that does not split evenly;
          with `labels`, ConfigError when the split has no labels.
        """

    @abc.abstractmethod
    def labelled_arrays(self, *, size: int, crop_fraction: float = 1.0, max_train_images: int = 0,
                        seed: int = 0, train_split: str = "") -> "ArrayDataset":
        """The un-augmented labelled train and eval images, in host memory.

        Args:
          size: sources that decode files resize the shorter side to
            round(size / crop_fraction) and keep the central size x size
            square; in-memory arrays come at their own size.
          max_train_images: at most this many train images (0 = all): the
            fixed random subset `knn_subset(N, max_train_images, seed)`
            (tensorflow-datasets: the first ones, in file order).
          train_split: the labelled train split ('' = the source's train_split).
        """

    @abc.abstractmethod
    def num_classes(self) -> int:
        """Label values: every labelled stream's labels lie in [0, num_classes),
        those of other splits mapped to the train split's classes."""

    @abc.abstractmethod
    def num_labelled(self, split: str = "", max_images: int = 0, seed: int = 0) -> int:
        """Examples M of the labelled stream of `split` ('' = the train split)
        capped at `max_images` (0 = all): the subset `knn_subset(N, max_images,
        seed)`."""

    @abc.abstractmethod
    def labelled_train_batches(self, *, global_batch: int, seed: int, crop_size: int, crop_scale=(0.08, 1.0),
                               start_step: int = 0, process_index: int = 0, process_count: int = 1,
                               num_local_devices: int = 1, split: str = "",
                               max_images: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Infinite, resumable stream of this process's share of each global
        batch of labelled `split` ('' = the train split), from global step
        `start_step`: the order of `local_batch_indices` over the M =
        `num_labelled(split, max_images, seed)` examples of the capped subset
        (the last partial batch of each epoch dropped).

        Yields:
          (images, labels int32 (num_local_devices, per_device)); images uint8
          (num_local_devices, per_device, crop_size, crop_size, 3), one
          RandomResizedCrop of each image (`crop_scale`, ratio 3/4..4/3,
          seeded by its place in the stream, no flip) with `host_cropped`, else
          the whole images (num_local_devices, per_device, H, W, 3).
        Raises (eagerly): ConfigError/ValueError for a batch that does not
          split evenly or exceeds M.
        """

    @abc.abstractmethod
    def eval_batches(self, *, split: str, size: int, crop_fraction: float, global_batch: int,
                     process_index: int = 0, process_count: int = 1, num_local_devices: int = 1,
                     max_images: int = 0, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The labelled images of `split`, in order: exactly
        `num_eval_steps(M, global_batch)` steps on every process, step s
        covering the capped subset's positions `eval_positions(global_batch, s,
        process_index, process_count)`, split evenly over the local devices.

        Yields:
          (images uint8 (num_local_devices, per_device, size, size, 3): the
          view of `labelled_arrays(size=size, crop_fraction=crop_fraction)`
          (in-memory arrays: their own H, W); labels int32 and valid bool
          (num_local_devices, per_device)). valid is False for the padding past
          M (a zero image, label 0) and for an image skipped as undecodable.
        Raises: ConfigError/ValueError (eagerly) for a batch that does not split
          evenly; UndecodableImageError naming an undecodable image unless the
          source skips them (skip_corrupt_images).
        """

    def with_train_subset(self, size: int, seed: int) -> "Source":
        """This source with its pretraining stream restricted to the fixed random
        subset `knn_subset(N, size, seed)` (size 0: unchanged). Only in-memory
        sources can pick examples freely; the others refuse."""
        if not size:
            return self
        raise ConfigError(
            f"train_subset={size} works for the in-memory datasets; for {self.name!r} select a subset with the split, "
            "e.g. --config.train_split='train[:10000]' (tensorflow-datasets slicing)")


def check_decode_size(name: str, size: int) -> None:
    """Sources that decode files need the side to decode labelled images to."""
    if size <= 0:
        raise ConfigError(f"{name}: labelled images need a positive size to decode to, got {size} "
                         "(linear evaluation: set --config.image_size)")


# --------------------------------------------------------------------------
# The example order: deterministic, resumable, multi-process aware.
# --------------------------------------------------------------------------
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffle order of epoch `epoch`: int64 (num_examples,), a permutation.

    Seeded by (seed, epoch) so any epoch can be recomputed directly on resume
    and on every process without replaying earlier epochs.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch; the partial remainder is dropped.

    MoCo enqueues whole batches into its key queue, so every step needs a full
    batch. Raises ValueError when not even one full batch fits.
    """
    steps = num_examples // global_batch
    if steps == 0:
        raise ConfigError(
            f"batch_size={global_batch} exceeds the {num_examples} examples: "
            "no full batch per epoch; lower batch_size")
    return steps


def local_batch_size(global_batch: int, process_count: int,
                      num_local_devices: int) -> int:
    """Per-process batch size, validating that the splits are exact."""
    if global_batch % process_count:
        raise ConfigError(
            f"global_batch={global_batch} is not divisible by process_count={process_count}")
    local = global_batch // process_count
    if local % num_local_devices:
        raise ConfigError(
            f"per-process batch {local} (global_batch={global_batch} / "
            f"process_count={process_count}) is not divisible by "
            f"num_local_devices={num_local_devices}")
    return local


def check_stream(global_batch: int, start_step: int, process_index: int, process_count: int,
                 num_local_devices: int) -> int:
    """Validate one process's view of the stream; returns its share of each
    global batch (`local_batch_size`)."""
    local = local_batch_size(global_batch, process_count, num_local_devices)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    return local


def local_batch_indices(num_examples: int, global_batch: int, seed: int,
                        start_step: int = 0, process_index: int = 0,
                        process_count: int = 1,
                        num_local_devices: int = 1) -> Iterator[np.ndarray]:
    """Infinite, resumable stream of the example indices of this process's
    share of each global batch; the order every source uses.

    Global step s (epoch e = s // steps_per_epoch) uses the global batch
    epoch_permutation(N, seed, e)[(s % spe) * global_batch:][:global_batch];
    process p takes its contiguous p-th 1/process_count slice of it.

    Yields:
      int64 (global_batch // process_count,), starting at global step `start_step`.
    Raises (eagerly, at call time):
      ValueError: bad divisibility, process_index or start_step.
    """
    check_stream(global_batch, start_step, process_index, process_count, num_local_devices)
    steps_per_epoch(num_examples, global_batch)  # at least one full batch
    # Validation above runs now; the generator below only runs on next().
    return (step_indices(num_examples, global_batch, seed, step, process_index, process_count)
            for step in itertools.count(start_step))


@functools.lru_cache(maxsize=2)
def _cached_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = epoch_permutation(num_examples, seed, epoch)
    perm.flags.writeable = False  # shared by every caller of this epoch
    return perm


def step_indices(num_examples: int, global_batch: int, seed: int, step: int, process_index: int = 0,
                 process_count: int = 1) -> np.ndarray:
    """The example indices of this process's share of global step `step`:
    int64 (global_batch // process_count,), what `local_batch_indices` yields
    at that step, computed directly (random access, e.g. from a grain
    worker). The epoch's permutation is cached, so one costs one shuffle."""
    spe = steps_per_epoch(num_examples, global_batch)
    local = global_batch // process_count
    start = (step % spe) * global_batch + process_index * local
    return _cached_permutation(num_examples, seed, step // spe)[start:start + local]


def array_batches(images: np.ndarray, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  num_local_devices: int = 1, labels: Optional[np.ndarray] = None) -> Iterator:
    """Infinite, resumable stream of this process's share of each global batch.

    The examples of each step are those of `local_batch_indices` (same
    arguments), so the order is deterministic for a seed and a run resumed at
    `start_step` continues exactly where it stopped.

    Args:
      images: uint8 (N, H, W, C).
      labels: int32 (N,), to yield with the images (None: images only).
    Yields:
      uint8 (num_local_devices, global_batch // process_count // num_local_devices,
      H, W, C), starting at global step `start_step`; with `labels`, (images,
      int32 (num_local_devices, global_batch // process_count // num_local_devices)).
    Raises (eagerly, at call time):
      ValueError: bad divisibility, process_index, start_step, image or label shape.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if labels is not None and np.shape(labels) != images.shape[:1]:
        raise ValueError(f"labels must be ({len(images)},), like the images, got shape {np.shape(labels)}")
    indices = local_batch_indices(len(images), global_batch, seed, start_step,
                                  process_index, process_count, num_local_devices)
    if labels is None:
        return (images[idx].reshape(num_local_devices, -1, *images.shape[1:]) for idx in indices)
    labels = np.asarray(labels, np.int32)
    return ((images[idx].reshape(num_local_devices, -1, *images.shape[1:]), labels[idx].reshape(num_local_devices, -1))
            for idx in indices)


def num_eval_steps(num_examples: int, global_batch: int) -> int:
    """Evaluation steps over `num_examples`: ceil(num_examples / global_batch),
    the last one padded (every process runs every step)."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    return -(-num_examples // global_batch)


def eval_positions(global_batch: int, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """The positions of this process's share of evaluation step `step`:
    int64 (global_batch // process_count,), contiguous, its p-th slice of
    [step * global_batch, (step + 1) * global_batch); those past the last
    example are padding."""
    local = global_batch // process_count
    return step * global_batch + process_index * local + np.arange(local, dtype=np.int64)


def knn_subset(num_examples: int, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `cap` examples (all when cap <= 0), drawn
    without replacement by `seed`: int64 (min(cap, N),)."""
    if cap <= 0 or cap >= num_examples:
        return np.arange(num_examples)
    return np.sort(np.random.default_rng(seed).permutation(num_examples)[:cap])
