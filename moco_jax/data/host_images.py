"""Host-side image decoding and random-resized cropping with Pillow and numpy
(no TensorFlow): what the grain input pipelines run per image.

Per pretraining image (everything else happens on the accelerator, see
`moco_jax.core.augment`):
  encoded bytes -> two RandomResizedCrop boxes, sampled exactly as
  `augment.crop_boxes` samples them (torchvision's rule) from uniforms seeded
  by the example's place in the stream -> one decode of the image, JPEGs
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

RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect ratios
CROP_ATTEMPTS = 10  # torchvision's number of tries before the central fallback


def crop_boxes(u: np.ndarray, height, width, scale, ratio=RATIO) -> np.ndarray:
    """`augment.crop_boxes` in numpy, for images of any sizes.

    Args:
      u: float32 (..., attempts, 4) uniforms `[area, log-ratio, top, left]`
        per try, e.g. (V, attempts, 4) for V boxes of one image.
      height, width: the images' sizes, ints or int arrays broadcastable to
        u.shape[:-2].
    Returns:
      int64 (..., 4) `[top, left, h, w]`: per box the first candidate that
      fits, else torchvision's central crop with the aspect ratio clamped.
    """
    u = np.asarray(u, np.float32)
    hf = np.asarray(height, np.float32)[..., None]  # broadcast over the attempts
    wf = np.asarray(width, np.float32)[..., None]
    area = hf * wf * (np.float32(scale[0]) + np.float32(scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = np.float32(math.log(ratio[0])), np.float32(math.log(ratio[1]))
    r = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # np.round is round-half-to-even, like Python's round() in torchvision.
    cw = np.round(np.sqrt(area * r))
    ch = np.round(np.sqrt(area / r))
    ok = (cw > 0) & (cw <= wf) & (ch > 0) & (ch <= hf)
    # torch.randint(0, n) == floor(U[0, 1) * n), clipped as in augment.py.
    top = np.clip(np.floor(u[..., 2] * (hf - ch + 1)), 0, np.maximum(hf - ch, 0))
    left = np.clip(np.floor(u[..., 3] * (wf - cw + 1)), 0, np.maximum(wf - cw, 0))
    candidates = np.stack([top, left, ch, cw], axis=-1)  # (..., A, 4)
    first = np.argmax(ok, axis=-1)  # first fit (0 if none)
    chosen = np.take_along_axis(candidates, first[..., None, None], axis=-2)[..., 0, :]
    fallback = _fallback_boxes(np.broadcast_to(np.asarray(height), first.shape),
                               np.broadcast_to(np.asarray(width), first.shape), ratio)
    return np.where(ok.any(axis=-1)[..., None], chosen, fallback).astype(np.int64)


def _fallback_boxes(height: np.ndarray, width: np.ndarray, ratio) -> np.ndarray:
    """torchvision's central crop with the aspect ratio clamped to `ratio`
    (`augment._fallback_box`, vectorised): int64 (..., 4)."""
    height, width = height.astype(np.float64), width.astype(np.float64)
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    h = np.where(narrow, np.round(width / min(ratio)), height)
    w = np.where(wide, np.round(height * max(ratio)), width)
    return np.stack([(height - h) // 2, (width - w) // 2, h, w], axis=-1).astype(np.int64)


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
