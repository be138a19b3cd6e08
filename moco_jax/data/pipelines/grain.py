"""The grain input pipeline (no TensorFlow): pretraining steps and labelled
arrays from any random-access collection of encoded images (`EncodedImages`):
an image folder's files or a tensorflow-datasets ArrayRecord split. Each
image is decoded and cropped by `pillow_ops`.

One grain element is one whole step of this process (or one chunk of
labelled images), computed by a pure function of its number: the indices of
`source.step_indices` (the example order of every source), and crops seeded
by each example's *global* stream position (`pillow_ops.stream_uniforms`).
So the elements can be computed in any thread or worker process, in any
order, and a run resumed at step s reads exactly the batches, crops included,
that an uninterrupted run reads from step s, on any number of processes.

Decoding runs in `threads` threads of each of `workers` grain worker
processes (0 workers: threads of the training process itself). Pillow
releases the GIL while it decodes and resizes, but about a third of the
per-image time is Python holding it, so beyond a few cores processes scale
where threads do not; on 2 cores threads deliver more, since a worker pays
for shipping its batches (BENCHMARKS.md, benchmarks/input_pipeline.py).

Undecodable images never stop a worker: each element reports which of its
images failed and why, and the training process raises an error naming the
file, or with `skip_corrupt` logs it with a running count (the slot is
filled with another image of the same step, so batches stay full: see
`undecodable`).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Iterator, Protocol

import grain
import numpy as np
from absl import flags
from PIL import Image

from moco_jax.data.pipelines import crop_rule, pillow_ops, undecodable
from moco_jax.data.source import SourceConfig, UndecodableImageError, check_stream, step_indices, steps_per_epoch

_ENDLESS = sys.maxsize // 4  # the length of an infinite stream, as a grain source
# What Pillow (or reading the file) raises for bytes it cannot decode.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class EncodedImages(Protocol):
    """Random access to encoded images; must pickle (grain sends it to its
    worker processes), so implementations open files lazily."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes:
        """The encoded bytes of example `index`."""

    def describe(self, index: int) -> str:
        """Where example `index` is, for messages: a path, a record number."""


@dataclasses.dataclass(frozen=True)
class Options:
    """How the pipeline runs: `workers` grain processes (0 = none) with
    `threads` decode threads each, and what to do with undecodable images."""

    workers: int = 0
    threads: int = 1
    skip_corrupt: bool = False

    @classmethod
    def from_spec(cls, spec: SourceConfig) -> "Options":
        return cls(spec.grain_workers, spec.grain_threads, spec.skip_corrupt_images)

    def read_options(self, prefetch: int) -> grain.ReadOptions:
        return grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=max(prefetch, self.threads))

    def parallel(self, dataset: grain.IterDataset) -> grain.IterDataset:
        if not self.workers:
            return dataset
        if not flags.FLAGS.is_parsed():
            # grain's worker start-up reads its absl flags; a library caller
            # (a notebook, a test) may not have parsed any: take the defaults.
            flags.FLAGS.mark_as_parsed()
        return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=2))


def _error(e: Exception) -> str:
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}".rstrip(": ")


# --------------------------------------------------------------------------
# Pretraining: two crops per image, one element per step.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Steps:
    """A grain random-access source: element i is global step start_step + i
    of this process, {"crops": uint8 (local, 2, S, S, 3), "indices", "ok",
    "reasons"}."""

    images: EncodedImages
    global_batch: int
    seed: int
    start_step: int
    process_index: int
    process_count: int
    crop_size: int
    crop_scale: tuple

    def __len__(self) -> int:
        return _ENDLESS

    def __getitem__(self, i: int) -> dict:
        step = self.start_step + int(i)
        indices = step_indices(len(self.images), self.global_batch, self.seed, step, self.process_index,
                               self.process_count)
        n, size = len(indices), self.crop_size
        out = np.empty((n, 2, size, size, 3), np.uint8)
        ok, reasons = np.ones(n, bool), []
        # Headers first, so that one vectorised call samples every box of the step.
        images, shapes = [None] * n, np.ones((n, 2), np.int64)
        for j, index in enumerate(indices):
            try:
                images[j] = pillow_ops.open_image(self.images.read(int(index)))
                shapes[j] = images[j].size[::-1]  # (height, width)
            except DECODE_ERRORS as e:
                ok[j] = False
                reasons.append((j, _error(e)))
        first = step * self.global_batch + self.process_index * n  # global stream position
        u = pillow_ops.stream_uniforms(self.seed, first + np.arange(n))
        boxes = crop_rule.crop_boxes(u, shapes[:, :1], shapes[:, 1:], self.crop_scale)  # (n, 2, 4)
        for j in np.flatnonzero(ok):
            try:
                pillow_ops.crops_into(out[j], images[j], boxes[j])
            except DECODE_ERRORS as e:
                ok[j] = False
                reasons.append((j, _error(e)))
        if ok.any() and not ok.all():  # (none decoded: the training process raises)
            undecodable.fill_gaps(out, ok)
        return {"crops": out, "indices": indices, "ok": ok, "reasons": tuple(r for _, r in sorted(reasons))}


def two_crop_batches(images: EncodedImages, *, global_batch: int, seed: int, crop_size: int, crop_scale,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     num_local_devices: int = 1, options: Options = Options()) -> Iterator[np.ndarray]:
    """Infinite stream of this process's share of each step: two independent
    RandomResizedCrops of each image of `source.step_indices`.

    Yields:
      uint8 (num_local_devices, per_device, 2, crop_size, crop_size, 3).
    Raises (eagerly): ConfigError/ValueError for bad batch divisibility; while
      iterating, UndecodableImageError naming the file unless options.skip_corrupt.
    """
    local = check_stream(global_batch, start_step, process_index, process_count, num_local_devices)
    steps_per_epoch(len(images), global_batch)  # at least one full batch, or a clear error now
    steps = _Steps(images, global_batch, seed, start_step, process_index, process_count, crop_size,
                   tuple(float(s) for s in crop_scale))
    dataset = options.parallel(grain.MapDataset.source(steps).to_iter_dataset(options.read_options(2)))
    return _checked(iter(dataset), images, options.skip_corrupt, num_local_devices, local)


def _checked(elements, images: EncodedImages, skip_corrupt: bool, num_local_devices: int,
             local: int) -> Iterator[np.ndarray]:
    """The crops of each element, after its undecodable images are reported.
    Closing this generator closes grain's iterator (and its workers)."""
    skipped = 0
    try:
        for element in elements:
            skipped = _report_undecodable(element, images, skip_corrupt, skipped)
            crops = element["crops"]
            yield crops.reshape(num_local_devices, local // num_local_devices, *crops.shape[1:])
    finally:
        elements.close()


def _report_undecodable(element: dict, images: EncodedImages, skip_corrupt: bool, skipped: int) -> int:
    """Raise naming an undecodable image, or log each with the running count
    (returned); a step with no decoded image always raises."""
    ok = element["ok"]
    if ok.all():
        return skipped
    failed = element["indices"][~ok]
    for index, reason in zip(failed, element["reasons"]):
        if not skip_corrupt:
            raise undecodable.error(images.describe(int(index)), reason)
        skipped += 1
        undecodable.log_skipped(images.describe(int(index)), skipped)
    if not ok.any():
        raise UndecodableImageError(f"no image of a step could be decoded, e.g. {images.describe(int(failed[0]))}")
    return skipped


# --------------------------------------------------------------------------
# Labelled arrays: centre crops, one element per chunk of images.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _CenterCrops:
    images: EncodedImages
    indices: np.ndarray
    size: int
    crop_fraction: float
    chunk: int

    def __len__(self) -> int:
        return -(-len(self.indices) // self.chunk)

    def __getitem__(self, i: int) -> dict:
        indices = self.indices[int(i) * self.chunk:(int(i) + 1) * self.chunk]
        out = np.zeros((len(indices), self.size, self.size, 3), np.uint8)
        ok, reasons = np.ones(len(indices), bool), []
        for j, index in enumerate(indices):
            try:
                out[j] = pillow_ops.center_crop(self.images.read(int(index)), self.size, self.crop_fraction)
            except DECODE_ERRORS as e:
                ok[j] = False
                reasons.append(_error(e))
        return {"images": out, "indices": indices, "ok": ok, "reasons": tuple(reasons)}


def center_crops(images: EncodedImages, indices, size: int, *, crop_fraction: float = 1.0,
                 options: Options = Options(), chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation view of images[indices] (`pillow_ops.center_crop`).

    Returns:
      (uint8 (M, size, size, 3), int64 (M,) positions in `indices` of the M
      decoded images, in order). Raises UndecodableImageError naming the first
      undecodable image unless options.skip_corrupt (then they are logged and
      left out).
    """
    indices = np.asarray(indices, np.int64)
    source = _CenterCrops(images, indices, size, float(crop_fraction), chunk)
    dataset = options.parallel(grain.MapDataset.source(source).to_iter_dataset(options.read_options(4)))
    kept, out = [], []
    for i, element in enumerate(dataset):
        ok = element["ok"]
        for index, reason in zip(element["indices"][~ok], element["reasons"]):
            if not options.skip_corrupt:
                raise undecodable.error(images.describe(int(index)), reason)
            undecodable.log_skipped(images.describe(int(index)))
        kept.append(i * chunk + np.flatnonzero(ok))
        out.append(element["images"][ok])
    if not out:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(out), np.concatenate(kept)
