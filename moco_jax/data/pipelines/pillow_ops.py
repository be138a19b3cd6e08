"""The grain pipeline's per-image operations, with Pillow and numpy (no
TensorFlow): decoding, random-resized crops and the evaluation view.

Per pretraining image (everything else happens on the accelerator, see
`moco_jax.core.augment`):
  encoded bytes -> two RandomResizedCrop boxes (`crop_rule.crop_boxes`:
  torchvision's rule, sampled exactly as `image_ops.crop_boxes` samples it)
  from uniforms seeded by the example's place in the stream -> one decode of
  the image, JPEGs reduced in the DCT domain where both boxes stay at least
  S pixels wide (Pillow's draft mode) -> either
  `crops_into`: each box resized to S x S with Pillow's antialiased bilinear
    filter (what torchvision's `RandomResizedCrop` does on PIL images) ->
    uint8 (2, S, S, 3); or
  `views_into` (config.resize_on_device): the decoded image (or its boxes)
    in a slot of P pixels and where each box lies in it -> uint8 (P, 3) and
    int32 (2, 4), which the accelerator cuts and resizes with the same
    filter (`image_ops.resize_views`, within 1 of the host's pixels), half
    the host's CPU per image.

Grayscale, palette, CMYK, RGBA and 16-bit images come out as 8-bit RGB (an
alpha channel is dropped, as PIL's convert('RGB') and tf.io.decode_image do).

Shapes: boxes are int `[top, left, height, width]`; crops uint8 (S, S, 3);
slots uint8 (P, 3) with views int32 `(offset, stride, height, width)`.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Optional

import numpy as np
from PIL import Image

try:  # libjpeg-turbo without Pillow's per-image overhead (optional: Pillow decodes without it)
    import simplejpeg
except ImportError:  # pragma: no cover - exercised by monkeypatching in tests
    simplejpeg = None

from moco_jax.data.pipelines.crop_rule import CROP_ATTEMPTS, RATIO, crop_boxes

_JPEG_START = b"\xff\xd8"
_TURBO_COLORSPACES = ("YCbCr", "Gray")  # CMYK/YCCK (Adobe's inverted inks): Pillow


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
@dataclasses.dataclass
class Opened:
    """An encoded image whose header is read (its size), not yet decoded.

    Attributes:
      encoded: the file's bytes.
      height, width: its full size in pixels.
      pil: the Pillow image, opened when Pillow decodes it (not a JPEG that
        `simplejpeg` decodes, or simplejpeg is not installed); else None.
    """

    encoded: bytes
    height: int
    width: int
    pil: Optional[Image.Image] = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow's `Image.size`."""
        return self.width, self.height


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


def _pillow(opened: Opened) -> Image.Image:
    if opened.pil is None:
        opened.pil = Image.open(io.BytesIO(opened.encoded))
    return opened.pil


def open_image(encoded: bytes) -> Opened:
    """The image of `encoded`, its header read (size), not yet decoded.

    JPEGs in YCbCr or grey go to simplejpeg when it is installed; everything
    else (PNG, CMYK JPEGs, bytes its header parser rejects) to Pillow, which
    raises OSError/ValueError/SyntaxError for what it cannot read.
    """
    if simplejpeg is not None and encoded[:2] == _JPEG_START:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(encoded)
        except ValueError:
            colorspace = None
        if colorspace in _TURBO_COLORSPACES:
            return Opened(encoded, int(height), int(width))
    image = Image.open(io.BytesIO(encoded))
    return Opened(encoded, image.size[1], image.size[0], image)


def reduction(width: int, height: int, fraction: float) -> int:
    """The DCT-domain reduction (1, 2, 4 or 8) a JPEG of this size is decoded
    at when only `fraction` of each side is needed: Pillow's `draft` rule
    (the largest that keeps ceil(side * fraction) pixels of both sides),
    applied only below half size."""
    if fraction >= 0.5:
        return 1
    scale = min(width // max(1, math.ceil(width * fraction)), height // max(1, math.ceil(height * fraction)))
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def decode(opened: Opened, fraction: float = 1.0) -> tuple[Image.Image, tuple[float, float]]:
    """Decode an `open_image` to RGB, where only `fraction` of each side is
    needed: JPEGs are then decoded at 1/2, 1/4 or 1/8 of their size, in the
    DCT domain (several times faster), when that still keeps the fraction.

    simplejpeg and Pillow decode with the same libjpeg-turbo settings (slow
    integer DCT, fancy upsampling) and the same reduction rule, so the pixels
    do not depend on which one ran (tests/test_grain_images.py); simplejpeg
    skips Pillow's per-image overhead. Anything simplejpeg rejects is decoded
    again by Pillow, so errors and odd files are Pillow's to report.

    Returns (RGB image, the (x, y) scale it was decoded at: exactly 1 without
    a reduction, else about 1/2, 1/4 or 1/8).
    Raises OSError/ValueError/SyntaxError (Pillow's) for undecodable bytes.
    """
    pixels, scale = decode_pixels(opened, fraction)
    return (Image.fromarray(pixels, "RGB") if isinstance(pixels, np.ndarray) else pixels), scale


def decode_pixels(opened: Opened, fraction: float = 1.0):
    """`decode` without wrapping simplejpeg's pixels in a Pillow image:
    (uint8 (h, w, 3) array, or the Pillow image where Pillow decoded it;
    the (x, y) scale)."""
    full_w, full_h = opened.size
    if opened.pil is None:
        pixels = _decode_turbo(opened, reduction(full_w, full_h, fraction))
        if pixels is not None:
            return pixels, (pixels.shape[1] / full_w, pixels.shape[0] / full_h)
    image = _pillow(opened)
    if fraction < 0.5 and image.format == "JPEG":
        # draft() picks the largest reduction keeping at least the requested size.
        image.draft("RGB", (max(1, math.ceil(full_w * fraction)), max(1, math.ceil(full_h * fraction))))
    image = _to_rgb(image)
    image.load()
    return image, (image.size[0] / full_w, image.size[1] / full_h)


def _decode_turbo(opened: Opened, reduce_by: int, buffer: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """simplejpeg's decode at 1/reduce_by of the size, uint8 (h, w, 3) (into
    `buffer` if given: uint8, h * w * 3 bytes); None if it fails or does not
    reduce exactly as asked (Pillow then decodes)."""
    want = (-(-opened.height // reduce_by), -(-opened.width // reduce_by))
    try:
        pixels = simplejpeg.decode_jpeg(opened.encoded, "RGB", min_height=want[0], min_width=want[1],
                                        min_factor=reduce_by, buffer=buffer)
    except ValueError:
        return None
    return pixels if pixels.shape[:2] == want else None


def _windows(boxes: np.ndarray, sx: float, sy: float) -> list[tuple[int, int, int, int]]:
    """Each full-size box `[top, left, h, w]` as the (left, top, right, bottom)
    window of an image decoded at scale (sx, sy)."""
    return [(round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy))
            for top, left, h, w in boxes.tolist()]


def crops_into(out: np.ndarray, image: Opened, boxes: np.ndarray) -> None:
    """Decode an `open_image` once and write each box, resized to S x S, into out[v].

    Args:
      out: uint8 (V, S, S, 3), written in place.
      boxes: int (V, 4) `[top, left, h, w]` in the full-size image.
    """
    size = out.shape[1]
    # A draft reduction keeps the smallest box side >= S: every output pixel
    # is still filtered from at least one decoded pixel.
    decoded, (sx, sy) = decode(image, size / float(boxes[:, 2:].min()))
    for v, window in enumerate(_windows(boxes, sx, sy)):
        # Crop, then resize: the filter sees only the box's pixels, as in
        # torchvision (Pillow's resize(box=...) would also read around it).
        out[v] = decoded.crop(window).resize((size, size), Image.BILINEAR)


def views_into(slot: np.ndarray, views: np.ndarray, image: Opened, boxes: np.ndarray, size: int) -> None:
    """Decode an `open_image` once (the same DCT reduction as `crops_into`)
    into `slot`, for the accelerator to cut and resize each box
    (`image_ops.views_from_slots`): the host is spared the resizes, about
    half of its CPU per image.

    Where the decoded image fits the slot (P >= its pixels, each box's sides
    <= C = isqrt(P)), a JPEG is decoded straight into it, with no copy, and
    the views point into the whole image; otherwise each box is copied into
    the slot one after the other (a box too large for what is left of it is
    resized to S x S here, as `crops_into` does).

    Args:
      slot: uint8 (P, 3), P >= V * S * S, written in place (the unused tail zeroed).
      views: int32 (V, 4), written: (offset, stride, height, width) of box v,
        whose pixel (y, x) is slot[offset + y * stride + x].
      boxes: int (V, 4) `[top, left, h, w]` in the full-size image.
      size: the crop side S.
    """
    fraction = size / float(boxes[:, 2:].min())
    if image.pil is None:  # simplejpeg: the decoded size is known before decoding
        r = reduction(image.width, image.height, fraction)
        dh, dw = -(-image.height // r), -(-image.width // r)
        windows = _windows(boxes, dw / image.width, dh / image.height)
        if _whole_fits(windows, dh, dw, len(slot)) and _decode_turbo(image, r, slot[:dh * dw]) is not None:
            _whole_image_views(slot, views, windows, dh, dw)
            return
    pixels, (sx, sy) = decode_pixels(image, fraction)
    pixels, windows = np.asarray(pixels), _windows(boxes, sx, sy)
    dh, dw = pixels.shape[:2]
    if _whole_fits(windows, dh, dw, len(slot)):
        slot[:dh * dw] = pixels.reshape(-1, 3)
        _whole_image_views(slot, views, windows, dh, dw)
    else:
        _pack_boxes(slot, views, pixels, windows, size)


def _whole_fits(windows, height: int, width: int, capacity: int) -> bool:
    side = math.isqrt(capacity)
    return height * width <= capacity and all(right - left <= side and bottom - top <= side
                                              for left, top, right, bottom in windows)


def _whole_image_views(slot: np.ndarray, views: np.ndarray, windows, height: int, width: int) -> None:
    slot[height * width:] = 0
    for v, (left, top, right, bottom) in enumerate(windows):
        views[v] = top * width + left, width, bottom - top, right - left


def _pack_boxes(slot: np.ndarray, views: np.ndarray, pixels: np.ndarray, windows, size: int) -> None:
    """Each box copied into the slot after the one before (a box larger than
    C x C, or than what is left once the later boxes' S x S are kept,
    resized to S x S here)."""
    side, used = math.isqrt(len(slot)), 0
    for v, (left, top, right, bottom) in enumerate(windows):
        h, w = bottom - top, right - left
        room = len(slot) - used - size * size * (len(windows) - 1 - v)
        if h <= side and w <= side and h * w <= room:
            slot[used:used + h * w] = pixels[top:bottom, left:right].reshape(-1, 3)
        else:
            h = w = size
            crop = Image.fromarray(pixels, "RGB").crop((left, top, right, bottom)).resize((size, size),
                                                                                         Image.BILINEAR)
            slot[used:used + size * size] = np.asarray(crop).reshape(-1, 3)
        views[v] = used, w, h, w
        used += h * w
    slot[used:] = 0


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
