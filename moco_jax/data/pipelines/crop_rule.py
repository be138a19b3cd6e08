"""torchvision's RandomResizedCrop box rule on the host, in numpy: its
constants, which both host pipelines use, and `crop_boxes`, what the grain
pipeline's crops (`pillow_ops`) are cut from. The same rule in TF ops is
`tf_ops.crop_boxes_from_uniforms`; on the device, `moco_jax.core.image_ops.
crop_boxes`. All three are the same function of the same uniforms
(tests/test_grain_images.py, tests/test_image_folder.py).

Shapes: boxes are int `[top, left, height, width]`.
"""
from __future__ import annotations

import math

import numpy as np

RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect ratios
CROP_ATTEMPTS = 10  # torchvision's number of tries before the central fallback


def crop_boxes(u: np.ndarray, height, width, scale, ratio=RATIO) -> np.ndarray:
    """`image_ops.crop_boxes` in numpy, for images of any sizes.

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
    # torch.randint(0, n) == floor(U[0, 1) * n), clipped as in image_ops.py.
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
    (`image_ops._fallback_box`, vectorised): int64 (..., 4)."""
    height, width = height.astype(np.float64), width.astype(np.float64)
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    h = np.where(narrow, np.round(width / min(ratio)), height)
    w = np.where(wide, np.round(height * max(ratio)), width)
    return np.stack([(height - h) // 2, (width - w) // 2, h, w], axis=-1).astype(np.int64)
