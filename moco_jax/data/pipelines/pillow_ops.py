"""The grain pipeline's per-image operations, with Pillow and numpy (no
TensorFlow): decoding, random-resized crops and the evaluation view.

Per pretraining image (everything else happens on the accelerator, see
`moco_jax.core.augment`):
  encoded bytes -> two RandomResizedCrop boxes (`crop_rule.crop_boxes`:
  torchvision's rule, sampled exactly as `image_ops.crop_boxes` samples it)
  from uniforms seeded by the example's place in the stream -> one decode of
  the image, JPEGs
  reduced in the DCT domain where both boxes stay at least S pixels wide
  (Pillow's draft mode) -> each box resized to S x S with Pillow's
  antialiased bilinear filter (what torchvision's `RandomResizedCrop` does on
  PIL images) -> uint8 (2, S, S, 3).

Grayscale, palette, CMYK, RGBA and 16-bit images come out as 8-bit RGB (an
alpha channel is dropped, as PIL's convert('RGB') and tf.io.decode_image do).

Shapes: boxes are int `[top, left, height, width]`; crops uint8 (S, S, 3).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from moco_jax.data.pipelines.crop_rule import CROP_ATTEMPTS, RATIO, crop_boxes


def stream_uniforms(seed: int, positions, num_boxes: int = 2) -> np.ndarray:
    """The crop uniforms of the examples at global stream `positions`:
    float32 (len(positions), num_boxes, CROP_ATTEMPTS, 4) in [0, 1).

    Each number is a counter-based hash (SplitMix64's finaliser) of (seed,
    position, its index), so it depends on nothing else: a resumed run, on
    any number of processes, draws the same boxes; and one vectorised call
    serves a whole step.
    """
    per_example = num_boxes * CROP_ATTEMPTS * 4
    counters = (np.asarray(positions, np.uint64)[:, None] * np.uint64(per_example)
                + np.arange(per_example, dtype=np.uint64))
    z = _splitmix64(counters ^ _splitmix64(np.uint64(seed) + np.uint64(0x632BE59BD9B4E019)))
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)  # 24 random bits: exact in float32
    return u.reshape(len(counters), num_boxes, CROP_ATTEMPTS, 4)


def _splitmix64(x):
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended
        x = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def example_uniforms(seed: int, position: int, num_boxes: int = 2) -> np.ndarray:
    """`stream_uniforms` of one example: float32 (num_boxes, CROP_ATTEMPTS, 4)."""
    return stream_uniforms(seed, [position], num_boxes)[0]


# --------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------
def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey (PNG): keep the high byte
        grey = (np.asarray(image, np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency -> alpha, which RGB then drops
    return image.convert("RGB")


def open_image(encoded: bytes) -> Image.Image:
    """The image of `encoded`, its header read (size, format), not yet decoded."""
    return Image.open(io.BytesIO(encoded))


def decode(image: Image.Image, fraction: float = 1.0) -> tuple[Image.Image, tuple[float, float]]:
    """Decode an `open_image` to RGB, where only `fraction` of each side is
    needed: JPEGs are then decoded at 1/2, 1/4 or 1/8 of their size, in the
    DCT domain (several times faster), when that still keeps the fraction.

    Returns (RGB image, the (x, y) scale it was decoded at: exactly 1 without
    a reduction, else about 1/2, 1/4 or 1/8).
    Raises OSError/ValueError/SyntaxError (Pillow's) for undecodable bytes.
    """
    full_w, full_h = image.size
    if fraction < 0.5 and image.format == "JPEG":
        # draft() picks the largest reduction keeping at least the requested size.
        image.draft("RGB", (max(1, math.ceil(full_w * fraction)), max(1, math.ceil(full_h * fraction))))
    image = _to_rgb(image)
    image.load()
    return image, (image.size[0] / full_w, image.size[1] / full_h)


def crops_into(out: np.ndarray, image: Image.Image, boxes: np.ndarray) -> None:
    """Decode an `open_image` once and write each box, resized to S x S, into out[v].

    Args:
      out: uint8 (V, S, S, 3), written in place.
      boxes: int (V, 4) `[top, left, h, w]` in the full-size image.
    """
    size = out.shape[1]
    # A draft reduction keeps the smallest box side >= S: every output pixel
    # is still filtered from at least one decoded pixel.
    image, (sx, sy) = decode(image, size / float(boxes[:, 2:].min()))
    for v, (top, left, h, w) in enumerate(boxes):
        # Crop, then resize: the filter sees only the box's pixels, as in
        # torchvision (Pillow's resize(box=...) would also read around it).
        window = (round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy))
        out[v] = image.crop(window).resize((size, size), Image.BILINEAR)


def two_crops(encoded: bytes, u: np.ndarray, size: int, scale, ratio=RATIO) -> np.ndarray:
    """Two RandomResizedCrops of one encoded image (JPEG, PNG, BMP, GIF, WebP...).

    Args:
      u: float32 (2, CROP_ATTEMPTS, 4), e.g. `example_uniforms`.
      size: output side S; scale: area fraction range, e.g. (0.2, 1.0).
    Returns:
      uint8 (2, S, S, 3).
    """
    image = open_image(encoded)
    out = np.empty((len(u), size, size, 3), np.uint8)
    crops_into(out, image, crop_boxes(u, image.size[1], image.size[0], scale, ratio))
    return out


def center_crop(encoded: bytes, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """Evaluation view: the shorter side resized to round(size / crop_fraction)
    (antialiased bilinear), then the central size x size window, as
    torchvision's Resize + CenterCrop. Returns uint8 (S, S, 3)."""
    image = open_image(encoded)
    width, height = image.size
    factor = round(size / crop_fraction) / min(height, width)
    new_w, new_h = max(round(width * factor), size), max(round(height * factor), size)
    image, _ = decode(image, factor)
    if image.size != (new_w, new_h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.asarray(image)[top:top + size, left:left + size]
