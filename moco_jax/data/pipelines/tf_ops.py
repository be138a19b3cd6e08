"""The tf.data pipeline's per-image operations, in TensorFlow ops: decoding,
random-resized crops and the evaluation view, and the crops' seeds.

This module imports TensorFlow at module level (and hides the GPUs from it),
so only the tf.data pipeline (`tfdata`) imports it, and only when a source
reads through it: the core library, the trainer, the grain pipeline and the
in-memory datasets never need TensorFlow.

What runs here, per image (everything else happens on the accelerator, see
`moco_jax.core.augment`):
  encoded bytes -> two (the linear probe: one) RandomResizedCrop boxes (torchvision's rule,
  `crop_rule`, the same sampling as `image_ops.crop_boxes`) -> decode only
  each box (JPEG: `tf.image.decode_and_crop_jpeg`; other formats are decoded
  whole, then sliced) -> bilinear resize to S x S -> uint8 (2, S, S, 3).

Shapes: boxes are int32 `[top, left, height, width]`; crops uint8 (S, S, 3).
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from absl import logging

from moco_jax.data.pipelines.crop_rule import CROP_ATTEMPTS, RATIO


def _hide_gpus() -> None:
    """Keep TensorFlow off the GPUs: JAX owns the accelerators, and TensorFlow
    would otherwise reserve all GPU memory on its first op. Runs on import,
    i.e. before any TensorFlow op of this library."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow was initialised elsewhere first
        logging.warning("TensorFlow was initialised before moco_jax could hide the GPUs from it")


_hide_gpus()


# --------------------------------------------------------------------------
# RandomResizedCrop boxes, torchvision semantics.
# --------------------------------------------------------------------------
def _fallback_box(height, width, ratio):
    """torchvision's central crop with the aspect ratio clamped to `ratio`."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    in_ratio = w / h
    crop_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    crop_w = tf.where(in_ratio < ratio[0], w,
                      tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
    crop_h, crop_w = tf.cast(crop_h, tf.int32), tf.cast(crop_w, tf.int32)
    return tf.stack([(height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w])


def crop_boxes_from_uniforms(u, height, width, scale, ratio=RATIO):
    """`image_ops.crop_boxes` for one image of dynamic size, in TF ops.

    u: float32 (V, attempts, 4) uniforms `[area, log-ratio, top, left]` per
    try, for V boxes of the same image; height, width: int32 scalars. For
    each box the first candidate that fits wins, else torchvision's central
    fallback. Returns int32 (V, 4) `[top, left, h, w]`.
    """
    hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = hf * wf * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = tf.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # tf.round is round-half-to-even, like Python's round() in torchvision.
    cw = tf.round(tf.sqrt(area * r))
    ch = tf.round(tf.sqrt(area / r))
    ok = (cw > 0) & (cw <= wf) & (ch > 0) & (ch <= hf)
    # torch.randint(0, n) == floor(U[0, 1) * n), clipped as in image_ops.py.
    top = tf.clip_by_value(tf.floor(u[..., 2] * (hf - ch + 1)), 0.0, tf.maximum(hf - ch, 0.0))
    left = tf.clip_by_value(tf.floor(u[..., 3] * (wf - cw + 1)), 0.0, tf.maximum(wf - cw, 0.0))
    candidates = tf.cast(tf.stack([top, left, ch, cw], axis=-1), tf.int32)  # (V, A, 4)
    first = tf.argmax(tf.cast(ok, tf.int32), axis=-1, output_type=tf.int32)  # first fit (0 if none)
    chosen = tf.gather(candidates, first, batch_dims=1)
    # One vectorised pass for all boxes: per-op overhead, not arithmetic,
    # is what this costs on the host.
    return tf.where(tf.reduce_any(ok, axis=-1, keepdims=True), chosen,
                    _fallback_box(height, width, ratio)[None])


def sample_crop_boxes(seed, height, width, scale, num_boxes: int = 2, ratio=RATIO):
    """`num_boxes` independent RandomResizedCrop boxes of one image, from a
    stateless seed (int (2,)): int32 (num_boxes, 4)."""
    u = tf.random.stateless_uniform([num_boxes, CROP_ATTEMPTS, 4], seed=seed, dtype=tf.float32)
    return crop_boxes_from_uniforms(u, height, width, scale, ratio)


# --------------------------------------------------------------------------
# Decode + crop + resize.
# --------------------------------------------------------------------------
def resize_to_uint8(image, size: int):
    """Bilinear resize of (h, w, 3) to uint8 (size, size, 3), as torchvision.

    torchvision antialiases (PIL's triangle filter); that only changes the
    result when shrinking, and TF's antialiased kernel is ~3x slower, so it
    is used only then. Upsampling is plain half-pixel bilinear, identical to
    the antialiased filter at scale >= 1.
    """
    shape = tf.shape(image)
    shrink = tf.logical_or(shape[0] > size, shape[1] > size)
    resized = tf.cond(
        shrink,
        lambda: tf.image.resize(image, [size, size], "bilinear", antialias=True),
        lambda: tf.image.resize(image, [size, size], "bilinear", antialias=False))
    # Both filters have non-negative weights summing to one, so the result
    # stays in [0, 255]: rounding half up needs no clip.
    return tf.cast(resized + 0.5, tf.uint8)


def _decode_any(encoded):
    """Any TF-decodable image (JPEG, PNG, BMP, GIF frame 0) -> uint8 (h, w, 3).
    Grayscale is replicated to RGB; an alpha channel is dropped (as PIL's
    convert('RGB') does)."""
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def two_crops(encoded, seed, size: int, scale, ratio=RATIO):
    """Two independent RandomResizedCrops of one encoded image.

    Args:
      encoded: scalar tf.string, the file's bytes.
      seed: int (2,) stateless seed of both views' boxes (`sample_crop_boxes`).
      size: output side S; scale: area fraction range, e.g. (0.2, 1.0).
    Returns:
      uint8 (2, S, S, 3).
    """
    return random_crops(encoded, seed, size, scale, 2, ratio)


def random_crops(encoded, seed, size: int, scale, views: int, ratio=RATIO):
    """`views` independent RandomResizedCrops of one encoded image (see
    `two_crops`): uint8 (views, S, S, 3)."""
    def jpeg():  # decode only each crop window
        shape = tf.image.extract_jpeg_shape(encoded)
        boxes = sample_crop_boxes(seed, shape[0], shape[1], scale, views, ratio)
        return tf.stack([resize_to_uint8(tf.image.decode_and_crop_jpeg(encoded, boxes[v], channels=3), size)
                         for v in range(views)])

    def other():  # PNG & co. cannot decode a window: decode once, slice each box
        image = _decode_any(encoded)
        shape = tf.shape(image)
        boxes = sample_crop_boxes(seed, shape[0], shape[1], scale, views, ratio)
        return tf.stack([resize_to_uint8(image[b[0]:b[0] + b[2], b[1]:b[1] + b[3]], size)
                         for b in tf.unstack(boxes, num=views)])

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def center_crop(encoded, size: int, crop_fraction: float = 1.0):
    """Evaluation view: shorter side resized to round(size / crop_fraction)
    (antialiased bilinear), then the central size x size window.

    crop_fraction 1.0 keeps CIFAR-sized images as they are; 0.875 is the
    ImageNet convention (resize 256, crop 224). Returns uint8 (S, S, 3).
    """
    image = _decode_any(encoded)
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    short = tf.cast(round(size / crop_fraction), tf.float64)
    factor = short / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * factor), tf.int32), size)
    resized = tf.image.resize(image, new, "bilinear", antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    window = resized[top:top + size, left:left + size]
    return tf.cast(tf.clip_by_value(tf.round(window), 0.0, 255.0), tf.uint8)


def example_seed(position, *stream: int):
    """Stateless seed (int64 (2,)) of one example's crops.

    `stream` (ints: the seed, process, epoch...) names the stream and
    `position` is the example's place in it, so a resumed run draws the same
    crops for the same step.
    """
    base = tf.constant(mix_seeds(*stream), tf.int64)
    return tf.stack([base, tf.cast(position, tf.int64)])


def mix_seeds(*ints: int) -> int:
    """Combine non-negative ints into one int63, order-sensitive."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1, np.uint64)[0] >> 1)
