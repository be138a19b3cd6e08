"""The grain input pipeline (no TensorFlow): pretraining steps, labelled
steps and labelled arrays from any random-access collection of encoded
images (`EncodedImages`): an image folder's files or a tensorflow-datasets
ArrayRecord split. Each image is decoded and cropped by `pillow_ops`.

  two_crop_batches  pretraining: two RandomResizedCrops of each image (and,
                    for an online probe, its label), resized here or, with
                    Options.resize_on_device, on the accelerator
  labelled_batches  the linear probe's training: one RandomResizedCrop of
                    each image of a subset, with its label, in the
                    pretraining order
  eval_batches      the evaluation view (`pillow_ops.center_crop`) of each
                    image of a subset, with its label, in order, padded to
                    whole steps
  center_crops      the evaluation view of a list of images, as one array

One grain element is one whole step of this process (or one chunk of
labelled images), computed by a pure function of its number: the indices of
`source.step_indices` (the example order of every source) or of
`source.eval_positions`, and crops seeded by each example's *global* stream
position (`pillow_ops.stream_uniforms`).
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
file, or with `skip_corrupt` logs it (in training with a running count, the
slot filled with another image of the same step, so batches stay full: see
`undecodable`; in evaluation the slot is marked not valid).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import sys
from typing import Callable, Iterator, Optional, Protocol

import grain
import numpy as np
from absl import flags
from PIL import Image

from moco_jax.data import host_resources
from moco_jax.data.pipelines import crop_rule, pillow_ops, undecodable
from moco_jax.data.source import (SourceConfig, UndecodableImageError, check_stream, eval_positions, num_eval_steps,
                                  step_indices, steps_per_epoch)

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

    def read_labelled(self, index: int) -> tuple[bytes, int]:
        """The encoded bytes and the label of example `index` (labelled
        collections only: the labelled streams read through it)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """How the pipeline runs: `workers` grain processes (0 = none) with
    `threads` decode threads each, and what to do with undecodable images.

    buffer: elements (chunks of steps) each worker process prefetches
      (grain's per_worker_buffer_size); they wait in shared memory
      (`host_resources`).
    threads_alone: decode threads of the training process should the workers
      not fit in shared memory (0: `threads`).
    host_processes: training processes of this host, which share /dev/shm.
    shm_dir: where grain's shared memory lives (a test's stand-in).
    read_threads: threads of each process that read a step's files ahead of
      its decoding (`read_ahead`; 0: read each file when it is decoded).
    resize_on_device: pretraining crops are cut and resized on the
      accelerator, the host only decoding each image into a slot
      (`two_crop_batches`); the labelled and evaluation streams are resized
      on the host either way.
    """

    workers: int = 0
    threads: int = 1
    skip_corrupt: bool = False
    buffer: int = 2
    threads_alone: int = 0
    host_processes: int = 1
    shm_dir: str = host_resources.SHM_DIR
    read_threads: int = 0
    resize_on_device: bool = False

    @classmethod
    def from_spec(cls, spec: SourceConfig) -> "Options":
        share = host_resources.cpu_share()
        return cls(spec.grain_workers, spec.grain_threads, spec.skip_corrupt_images,
                   threads_alone=spec.input_threads or share.cpus, host_processes=share.processes,
                   read_threads=spec.input_read_threads, resize_on_device=spec.resize_on_device)

    def fitted(self, element_bytes: int) -> "Options":
        """These options with worker processes whose buffered elements of
        `element_bytes` bytes each fit the free shared memory now
        (`host_resources.fit_shm`: a smaller buffer, fewer workers, or none,
        decoding in `threads_alone` threads; one warning says what and why)."""
        workers, buffer = host_resources.fit_shm(self.workers, self.buffer, element_bytes, self.host_processes,
                                                 self.threads_alone or self.threads, self.shm_dir)
        if (workers, buffer) == (self.workers, self.buffer):
            return self
        threads = self.threads if workers else (self.threads_alone or self.threads)
        return dataclasses.replace(self, workers=workers, buffer=buffer, threads=threads)

    def read_options(self, prefetch: int) -> grain.ReadOptions:
        return grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=max(prefetch, self.threads))

    def parallel(self, dataset: grain.IterDataset) -> grain.IterDataset:
        """`dataset` run in `workers` processes; call it on `fitted` options
        (what the workers buffer must fit in /dev/shm)."""
        if not self.workers:
            return dataset
        if not flags.FLAGS.is_parsed():
            # grain's worker start-up reads its absl flags; a library caller
            # (a notebook, a test) may not have parsed any: take the defaults.
            flags.FLAGS.mark_as_parsed()
        return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                                per_worker_buffer_size=self.buffer))


def _error(e: Exception) -> str:
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}".rstrip(": ")


# --------------------------------------------------------------------------
# Training steps: random crops of each image, one element per step.
# --------------------------------------------------------------------------
IMAGES_PER_ELEMENT = 32  # training elements: a step's images in chunks of this many (`_Steps`)
SLOT_SIDES = 2  # resized on the accelerator, an image's slot holds (2 S)^2 pixels: a 500 x 375 photo at S = 224
_PER_IMAGE = {"crops", "slots", "views", "labels"}  # an element's arrays of one row per image


@dataclasses.dataclass(frozen=True)
class _Steps:
    """A grain random-access source: element k is chunk k % c of global step
    start_step + k // c of this process (c = `chunks`: its local batch in
    pieces of `chunk` images), `random_crops`' {"crops": uint8 (chunk, views,
    S, S, 3)} (with `slot`: {"slots", "views"}, resized on the accelerator),
    "indices", "ok", "reasons", and with `labelled` "labels": int32 (chunk,);
    `_steps` joins each step's chunks.

    Chunks, not whole steps, so that a step is decoded by several workers at
    once and what each worker holds in shared memory (grain keeps 2 x buffer
    + 2 elements per worker) is bounded by `chunk`, whatever the batch size.

    subset: int64 (M,), the examples the order runs over (position i is
    example subset[i]); None: all of `images`."""

    images: EncodedImages
    global_batch: int
    seed: int
    start_step: int
    process_index: int
    process_count: int
    crop_size: int
    crop_scale: tuple
    views: int = 2
    subset: Optional[np.ndarray] = None
    labelled: bool = False
    read_threads: int = 0
    chunk: int = IMAGES_PER_ELEMENT
    slot: int = 0

    def __len__(self) -> int:
        return _ENDLESS

    @property
    def chunks(self) -> int:
        """Elements per step."""
        return -(-self.global_batch // self.process_count // self.chunk)

    @property
    def element_bytes(self) -> int:
        """The bytes of one element's crops (what shared memory holds)."""
        per_image = self.slot * 3 or self.views * self.crop_size ** 2 * 3
        return min(self.chunk, self.global_batch // self.process_count) * per_image

    def __getitem__(self, k: int) -> dict:
        step, c = divmod(int(k), self.chunks)
        step += self.start_step
        count = len(self.images) if self.subset is None else len(self.subset)
        local = step_indices(count, self.global_batch, self.seed, step, self.process_index, self.process_count)
        lo = c * self.chunk
        indices = local[lo:lo + self.chunk]
        if self.subset is not None:
            indices = self.subset[indices]
        first = step * self.global_batch + self.process_index * len(local) + lo  # global stream position
        u = pillow_ops.stream_uniforms(self.seed, first + np.arange(len(indices)), self.views)
        element = random_crops(self.images, indices, u, self.crop_size, self.crop_scale, self.labelled,
                               self.read_threads, slot=self.slot)
        if not self.labelled:
            del element["labels"]
        return {**element, "indices": indices}


def _steps(elements: Iterator[dict], chunks: int) -> Iterator[dict]:
    """Whole steps from `chunks` consecutive `_Steps` elements each: arrays
    joined, reasons in order, and the slots of undecodable images filled
    with other images of the step (`undecodable.fill_gaps`; a step with none
    decoded is left for `_checked` to raise). Closing it closes `elements`."""
    try:
        while True:
            parts = list(itertools.islice(elements, chunks))
            if len(parts) < chunks:
                return
            step = {key: np.concatenate([p[key] for p in parts]) if chunks > 1 else parts[0][key]
                    for key in parts[0] if key != "reasons"}
            step["reasons"] = tuple(r for p in parts for r in p["reasons"])
            ok = step["ok"]
            if ok.any() and not ok.all():
                for key in _PER_IMAGE.intersection(step):
                    undecodable.fill_gaps(step[key], ok)
            yield step
    finally:
        elements.close()


def random_crops(images: EncodedImages, indices: np.ndarray, u: np.ndarray, size: int, scale, labelled: bool,
                 read_threads: int, chunk: int = 8, slot: int = 0) -> dict:
    """The RandomResizedCrops of images[indices], box v of image j drawn from
    u[j, v] (`crop_rule.crop_boxes`): resized here, or, with `slot`, each
    image decoded into a slot of that many pixels for the accelerator to cut
    and resize its boxes (`pillow_ops.views_into`).

    The files are read ahead in `read_threads` threads (`read_ahead`) while
    the images before them decode; the images are taken in chunks of
    `chunk`, each chunk's headers read first so that one vectorised call
    draws its boxes (small chunks, so that decoding starts while the later
    files of the element are still being read).

    Args:
      u: float32 (n, V, CROP_ATTEMPTS, 4) uniforms.
      slot: 0, or the pixels P of each image's slot (P >= V * size**2).
    Returns:
      {"crops": uint8 (n, V, S, S, 3)}, or with `slot` {"slots": uint8 (n,
      P, 3), "views": int32 (n, V, 4)} (`pillow_ops.views_into`); and
      "labels": int32 (n,) (zeros unless `labelled`), "ok": bool (n,),
      "reasons": why the images that failed did, in order. An undecodable
      image's arrays are left unwritten.
    """
    n = len(indices)
    if slot:
        if slot < u.shape[1] * size ** 2:
            raise ValueError(f"a slot of {slot} pixels cannot hold {u.shape[1]} crops of {size} x {size}")
        arrays = {"slots": np.empty((n, slot, 3), np.uint8), "views": np.zeros((n, u.shape[1], 4), np.int32)}
    else:
        arrays = {"crops": np.empty((n, u.shape[1], size, size, 3), np.uint8)}
    labels, ok, reasons = np.zeros(n, np.int32), np.ones(n, bool), {}
    reads = read_ahead(images, indices, labelled, read_threads)
    for lo in range(0, n, chunk):
        opened, shapes = {}, np.ones((min(n, lo + chunk) - lo, 2), np.int64)
        for j in range(lo, lo + len(shapes)):
            try:
                encoded = next(reads)()
                if labelled:
                    encoded, labels[j] = encoded
                opened[j] = pillow_ops.open_image(encoded)
                shapes[j - lo] = opened[j].height, opened[j].width
            except DECODE_ERRORS as e:
                reasons[j] = _error(e)
        boxes = crop_rule.crop_boxes(u[lo:lo + len(shapes)], shapes[:, :1], shapes[:, 1:], scale)  # (c, V, 4)
        for j, image in opened.items():
            try:
                if slot:
                    pillow_ops.views_into(arrays["slots"][j], arrays["views"][j], image, boxes[j - lo], size)
                else:
                    pillow_ops.crops_into(arrays["crops"][j], image, boxes[j - lo])
            except DECODE_ERRORS as e:
                reasons[j] = _error(e)
    ok[list(reasons)] = False
    return {**arrays, "labels": labels, "ok": ok, "reasons": tuple(reasons[j] for j in sorted(reasons))}


_READERS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}  # threads -> this process's pool


def read_ahead(images: EncodedImages, indices: np.ndarray, labelled: bool, threads: int) -> Iterator[Callable]:
    """For each of `indices` in order, a call returning its encoded bytes
    (labelled: (bytes, label)) or raising what reading raised. With
    `threads` > 0 all are submitted at once to `threads` threads of this
    process (one pool per process, so also per grain worker), which read
    them in order while the caller decodes the ones before: a network
    filesystem's latency is hidden behind the decoding; 0 reads each when
    it is called."""
    read = images.read_labelled if labelled else images.read
    if threads <= 0:
        return (functools.partial(read, int(index)) for index in indices)
    pool = _READERS.get(threads)
    if pool is None:
        pool = _READERS[threads] = concurrent.futures.ThreadPoolExecutor(threads, "moco_jax-read")
    return (future.result for future in [pool.submit(read, int(index)) for index in indices])


def two_crop_batches(images: EncodedImages, *, global_batch: int, seed: int, crop_size: int, crop_scale,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     num_local_devices: int = 1, options: Options = Options(), labels: bool = False) -> Iterator:
    """Infinite stream of this process's share of each step: two independent
    RandomResizedCrops of each image of `source.step_indices`; with `labels`,
    each image's label too, read with it (`images.read_labelled`).

    Yields:
      uint8 (num_local_devices, per_device, 2, crop_size, crop_size, 3); with
      options.resize_on_device, (slots uint8 (num_local_devices, per_device,
      P, 3), views int32 (num_local_devices, per_device, 2, 4)) instead, P =
      (SLOT_SIDES * crop_size)^2: each image decoded into its slot, each
      box's (offset, stride, height, width) in it, for the accelerator to cut
      and resize (`pillow_ops.views_into`, `augment.make_views_fn`); with
      `labels`, (those crops, int32 (num_local_devices, per_device)). A
      skipped image's place holds the crops and label of the image that fills it.
    Raises (eagerly): ConfigError/ValueError for bad batch divisibility; while
      iterating, UndecodableImageError naming the file unless options.skip_corrupt.
    """
    check_stream(global_batch, start_step, process_index, process_count, num_local_devices)
    steps_per_epoch(len(images), global_batch)  # at least one full batch, or a clear error now
    slot = (SLOT_SIDES * crop_size) ** 2 if options.resize_on_device else 0
    # A slot weighs two crops: half as many images per element keeps the bytes per element.
    steps = _Steps(images, global_batch, seed, start_step, process_index, process_count, crop_size,
                   tuple(float(s) for s in crop_scale), labelled=labels, read_threads=options.read_threads,
                   chunk=IMAGES_PER_ELEMENT // 2 if slot else IMAGES_PER_ELEMENT, slot=slot)
    elements = _steps(_elements(steps, options, steps.element_bytes, 2 * steps.chunks), steps.chunks)

    def unpack(e: dict):
        crops = (_per_device(e["slots"], e["views"], n=num_local_devices) if slot
                 else _per_device(e["crops"], n=num_local_devices)[0])
        return (crops, _per_device(e["labels"], n=num_local_devices)[0]) if labels else crops

    return _checked(elements, images, options.skip_corrupt, unpack)


def labelled_batches(images: EncodedImages, subset, *, global_batch: int, seed: int, crop_size: int, crop_scale,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     num_local_devices: int = 1, options: Options = Options()
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Infinite stream of this process's share of each step over the examples
    `subset` (int (M,) indices into `images`): position i is example
    subset[i], taken in the order of `source.step_indices` over the M
    positions; one RandomResizedCrop of each image, seeded by its global
    stream position (`stream_uniforms(..., num_boxes=1)`), no flip; its
    label from `images.read_labelled`. An undecodable image is reported as
    in `two_crop_batches` (skipped, its slot and label are those of another
    example of the step).

    Yields:
      (uint8 (num_local_devices, per_device, crop_size, crop_size, 3),
      int32 (num_local_devices, per_device)).
    Raises (eagerly): ConfigError/ValueError for bad batch divisibility.
    """
    check_stream(global_batch, start_step, process_index, process_count, num_local_devices)
    subset = np.asarray(subset, np.int64)
    steps_per_epoch(len(subset), global_batch)
    steps = _Steps(images, global_batch, seed, start_step, process_index, process_count, crop_size,
                   tuple(float(s) for s in crop_scale), views=1, subset=_unless_all(subset, images),
                   labelled=True, read_threads=options.read_threads)
    return _checked(_steps(_elements(steps, options, steps.element_bytes, 2 * steps.chunks), steps.chunks), images,
                    options.skip_corrupt, lambda e: _per_device(e["crops"][:, 0], e["labels"], n=num_local_devices))


def _unless_all(subset: np.ndarray, images: EncodedImages) -> Optional[np.ndarray]:
    """`subset` (sorted distinct indices), or None where it is all of
    `images`: what grain pickles into each worker then does not grow with
    the dataset."""
    return None if len(subset) == len(images) else subset


def _elements(source, options: Options, element_bytes: int, prefetch: int = 2):
    """grain's iterator over the elements of the random-access `source`, in
    worker processes whose buffered elements (of `element_bytes` each) fit
    the free shared memory (`Options.fitted`)."""
    options = options.fitted(element_bytes)
    return iter(options.parallel(grain.MapDataset.source(source).to_iter_dataset(options.read_options(prefetch))))


def _per_device(*arrays: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Each (local, ...) array as (n, local // n, ...)."""
    return tuple(a.reshape(n, -1, *a.shape[1:]) for a in arrays)


def _checked(elements, images: EncodedImages, skip_corrupt: bool, unpack: Callable[[dict], object],
             counted: bool = True) -> Iterator:
    """unpack(element) of each element, after its undecodable images are
    reported (`_report_undecodable`): in training (`counted`) with a running
    count, and a step with no decoded image raises; in evaluation as the
    labelled arrays report them. Closing this generator closes grain's
    iterator (and its workers)."""
    skipped = 0 if counted else None
    try:
        for element in elements:
            skipped = _report_undecodable(element, images, skip_corrupt, skipped)
            if counted and not element["ok"].any():
                raise UndecodableImageError(
                    f"no image of a step could be decoded, e.g. {images.describe(int(element['indices'][0]))}")
            yield unpack(element)
    finally:
        elements.close()


def _report_undecodable(element: dict, images: EncodedImages, skip_corrupt: bool,
                        skipped: Optional[int]) -> Optional[int]:
    """Raise naming the first undecodable image of `element` (those of its
    "indices" whose "ok" is False, "reasons" saying why), or, skipping, log
    each with the running count `skipped` (returned; None: without a count)."""
    ok = element["ok"]
    if ok.all():
        return skipped
    for index, reason in zip(element["indices"][~ok], element["reasons"]):
        what = images.describe(int(index))
        if not skip_corrupt:
            raise undecodable.error(what, reason)
        skipped = None if skipped is None else skipped + 1
        undecodable.log_skipped(what, skipped)
    return skipped


# --------------------------------------------------------------------------
# Evaluation: the centre crops of each image with its label, in order.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _EvalSteps:
    """A grain random-access source: element s is this process's share of
    evaluation step s over the examples `subset` (int64 (M,)), {"images":
    uint8 (local, size, size, 3), "labels": int32 (local,), "valid": bool
    (local,), "indices", "ok", "reasons"} ("indices", "ok": of the real
    examples, a prefix of the step; the rest is padding)."""

    images: EncodedImages
    subset: Optional[np.ndarray]  # None: all of `images`
    global_batch: int
    process_index: int
    process_count: int
    size: int
    crop_fraction: float

    def __len__(self) -> int:
        return num_eval_steps(len(self.images if self.subset is None else self.subset), self.global_batch)

    def __getitem__(self, s: int) -> dict:
        positions = eval_positions(self.global_batch, int(s), self.process_index, self.process_count)
        count = len(self.images if self.subset is None else self.subset)
        indices = positions[positions < count]  # the step is contiguous: a prefix
        if self.subset is not None:
            indices = self.subset[indices]
        out = np.zeros((len(positions), self.size, self.size, 3), np.uint8)
        labels, valid = np.zeros(len(positions), np.int32), np.zeros(len(positions), bool)
        reasons = []
        for j, index in enumerate(indices):
            try:
                encoded, label = self.images.read_labelled(int(index))
                out[j] = pillow_ops.center_crop(encoded, self.size, self.crop_fraction)
                labels[j], valid[j] = label, True
            except DECODE_ERRORS as e:
                reasons.append(_error(e))
        return {"images": out, "labels": labels, "valid": valid, "indices": indices,
                "ok": valid[:len(indices)], "reasons": tuple(reasons)}


def eval_batches(images: EncodedImages, subset, *, size: int, crop_fraction: float, global_batch: int,
                 process_index: int = 0, process_count: int = 1, num_local_devices: int = 1,
                 options: Options = Options()) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's share of each evaluation step over the examples `subset`
    (int (M,) indices into `images`): `num_eval_steps(M, global_batch)`
    steps, step s the positions `source.eval_positions(global_batch, s,
    process_index, process_count)`, each image's evaluation view
    (`pillow_ops.center_crop`) with its label (`images.read_labelled`).

    Yields:
      (uint8 (num_local_devices, per_device, size, size, 3), int32 and bool
      (num_local_devices, per_device)): images, labels, valid (False for the
      padding past M and a skipped undecodable image: zeros, label 0).
    Raises: ConfigError/ValueError (eagerly) for bad batch divisibility;
      UndecodableImageError naming an undecodable image unless
      options.skip_corrupt (then it is logged).
    """
    check_stream(global_batch, 0, process_index, process_count, num_local_devices)
    subset = _unless_all(np.asarray(subset, np.int64), images)
    steps = _EvalSteps(images, subset, global_batch, process_index, process_count, size, float(crop_fraction))
    if not len(steps):
        return iter(())
    element_bytes = global_batch // process_count * size ** 2 * 3
    return _checked(_elements(steps, options, element_bytes), images, options.skip_corrupt,
                    lambda e: _per_device(e["images"], e["labels"], e["valid"], n=num_local_devices),
                    counted=False)


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
    kept, out = [], []
    for i, element in enumerate(_elements(source, options, chunk * size ** 2 * 3, prefetch=4)):
        _report_undecodable(element, images, options.skip_corrupt, None)
        ok = element["ok"]
        kept.append(i * chunk + np.flatnonzero(ok))
        out.append(element["images"][ok])
    if not out:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(out), np.concatenate(kept)
