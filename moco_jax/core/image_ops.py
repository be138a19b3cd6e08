"""Batched, jit-able image operations for MoCo's augmentations, in pure JAX.

The reference MoCo pipelines run torchvision transforms on the host, one PIL
image at a time. Here the same transforms run on the accelerator inside the
(p)mapped training step, on a whole NHWC batch at once, so the host only has
to decode images. This module holds the operations themselves (crop boxes and
crop-and-resize, flip, colour jitter, grayscale, blur, solarize, normalize,
the evaluation view); `moco_jax.core.augment` composes them into the MoCo
recipes and views. Conventions used throughout:

* images are NHWC; float images are float32 in [0, 1] until `normalize`;
* every random op takes its randomness as uniforms `u` in [0, 1), one row
  per image (shapes in each docstring), and is deterministic given them;
  every image of the batch gets its own parameters (torchvision draws them
  per call, i.e. per image);
* nothing branches in Python on traced values: per-image decisions are
  `jnp.where` selects, so everything works under `jit`, `vmap` and `pmap`.
  Only static configuration (jitter strengths, sizes, kernel sizes, the
  `augment.Recipe`) is looked at in Python; probabilities p may be traced
  scalars.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma, as PIL's convert("L") (torchvision's PIL path). The
# tensor path of torchvision uses 0.2989 for red; 0.299 makes the weights sum
# to exactly one, so grey stays grey and contrast/saturation keep the mean.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# Index of each ColorJitter adjustment; torchvision's `fn_idx` uses this order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _per_image(x):
    """(B,) -> (B, 1, 1, 1), to broadcast a per-image scalar over NHWC."""
    return jnp.asarray(x, jnp.float32).reshape(-1, 1, 1, 1)


def _select(u, p, new, old):
    """Per image, `new` where u < p else `old` (torchvision `torch.rand(1) < p`)."""
    return jnp.where(_per_image(u < p) > 0, new, old)


# --------------------------------------------------------------------------
# Random resized crop
# --------------------------------------------------------------------------

def _fallback_box(height, width, ratio):
    """torchvision's central-crop fallback; static, so plain Python."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_boxes(u, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop boxes sampled like torchvision `RandomResizedCrop.get_params`.

    For each image, A candidates (10 in torchvision) are drawn: area fraction
    ~ U(scale), aspect ratio log-uniform in `ratio`, w = round(sqrt(area * r)),
    h = round(sqrt(area / r)); the first candidate with 0 < w <= width and
    0 < h <= height is kept, with top/left uniform integers in [0, H - h] /
    [0, W - w]. If none fits, torchvision's central crop with the aspect ratio
    clamped to `ratio` is used. All attempts are evaluated at once and the
    first valid one selected, instead of looping.

    Args:
      u: uniforms (B, 4 * A), `[area, log-ratio, top, left]` per attempt.
      height, width: static ints, the source images' H and W.
    Returns:
      float32 (B, 4) boxes `[top, left, crop_h, crop_w]` in (integer) pixels.
    """
    u = u.reshape(u.shape[0], -1, 4)  # [area, ratio, top, left] per attempt
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = jnp.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # jnp.round is round-half-to-even, like Python's round() in torchvision.
    w = jnp.round(jnp.sqrt(area * r))
    h = jnp.round(jnp.sqrt(area / r))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # torch.randint(0, n) == floor(U[0, 1) * n); the clip guards float round-up
    # and keeps rejected candidates (n <= 0) harmless.
    top = jnp.floor(u[..., 2] * (height - h + 1))
    left = jnp.floor(u[..., 3] * (width - w + 1))
    top = jnp.clip(top, 0, jnp.maximum(height - h, 0))
    left = jnp.clip(left, 0, jnp.maximum(width - w, 0))
    candidates = jnp.stack([top, left, h, w], axis=-1)  # (B, A, 4)
    first = jnp.argmax(ok, axis=1)  # index of the first True (0 if none)
    chosen = jnp.take_along_axis(candidates, first[:, None, None], axis=1)[:, 0]
    fallback = jnp.asarray(_fallback_box(height, width, ratio), jnp.float32)
    return jnp.where(ok.any(axis=1)[:, None], chosen, fallback).astype(jnp.float32)


def _resize_weights(start, length, in_size: int, out_size: int):
    """(out_size, in_size) bilinear weights resampling [start, start+length).

    The antialiased triangle filter of torchvision/PIL (and of
    `jax.image.scale_and_translate(method='linear', antialias=True)`): output
    pixel i is centred at `start + (i + 0.5) * length / out_size` in input
    coordinates, the triangle is widened by the downscale factor, and the
    weights are renormalised over the pixels *inside the box*. That last point
    is what makes this crop-then-resize: input pixels just outside the box
    never leak into the edge rows, exactly as if the box had been cut out
    first (which is what torchvision does).
    """
    inv_scale = length / out_size
    kernel_scale = jnp.maximum(inv_scale, 1.0)  # antialias only when shrinking
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale
    pix = jnp.arange(in_size, dtype=jnp.float32) + 0.5
    dist = jnp.abs(pix[None, :] - centres[:, None]) / kernel_scale
    inside = (pix > start) & (pix < start + length)
    weights = jnp.where(inside[None, :], jnp.maximum(0.0, 1.0 - dist), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def crop_and_resize(images, boxes, size: int):
    """Crop each box and resize it bilinearly to (size, size).

    Reproduces torchvision `F.resized_crop(img, top, left, h, w, [size, size],
    InterpolationMode.BILINEAR, antialias=True)` (torchvision's default for
    tensors; PIL's BILINEAR uses the same filter), computed in float32 without
    the uint8 rounding.

    Args:
      images: float (B, H, W, C).
      boxes: (B, 4) `[top, left, crop_h, crop_w]` in pixels.
      size: static int output side.
    Returns:
      float32 (B, size, size, C).
    """
    _, height, width, _ = images.shape
    boxes = jnp.asarray(boxes, jnp.float32)
    rows = jax.vmap(lambda s, l: _resize_weights(s, l, height, size))(
        boxes[:, 0], boxes[:, 2])  # (B, size, H)
    cols = jax.vmap(lambda s, l: _resize_weights(s, l, width, size))(
        boxes[:, 1], boxes[:, 3])  # (B, size, W)
    # Separable resampling as two batched matmuls; HIGHEST precision keeps
    # TPU/GPU from doing this in bf16/tf32, which would visibly band images.
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum('boh,bhwc->bowc', rows, images.astype(jnp.float32), precision=hi)
    return jnp.einsum('bpw,bowc->bopc', cols, out, precision=hi)


def views_from_slots(slots, views, side: int):
    """Cut each view's box out of its image slot (what the host sends when the
    accelerator resizes: `moco_jax.data.pipelines.pillow_ops.views_into`).

    Args:
      slots: uint8 (B, P, 3), the decoded pixels of each image.
      views: int (B, 4) `(offset, stride, height, width)`: pixel (y, x) of the
        box is slots[b, offset + y * stride + x]; height, width <= side.
      side: static int, the canvas side (P = side**2 for the host's slots).
    Returns:
      uint8 (B, side, side, 3), each box in the top-left corner, zeros
      elsewhere: `crop_and_resize(..., [0, 0, height, width], size)` of it is
      the view.
    """
    y = jnp.arange(side, dtype=jnp.int32)[:, None]
    x = jnp.arange(side, dtype=jnp.int32)[None, :]

    def one(slot, view):
        offset, stride, height, width = view[0], view[1], view[2], view[3]
        inside = (y < height) & (x < width)
        pixels = jnp.take(slot, jnp.where(inside, offset + y * stride + x, 0), axis=0)  # (side, side, 3)
        return jnp.where(inside[..., None], pixels, jnp.zeros((), slot.dtype))

    return jax.vmap(one)(slots, jnp.asarray(views, jnp.int32))


def resize_views(slots, views, size: int):
    """The views of `views_from_slots`, each resized to (size, size) as
    `crop_and_resize` resizes a box: float32 (B, size, size, 3) in [0, 255]."""
    side = math.isqrt(slots.shape[1])
    canvas = views_from_slots(slots, views, side)
    hw = jnp.asarray(views, jnp.float32)[:, 2:]
    return crop_and_resize(canvas, jnp.concatenate([jnp.zeros_like(hw), hw], axis=-1), size)


# --------------------------------------------------------------------------
# Flip
# --------------------------------------------------------------------------

def flip(u, images, p: float = 0.5):
    """torchvision `RandomHorizontalFlip(p)`: image b is flipped where u[b] < p.

    u: (B,) uniforms; images: (B, H, W, C) -> same shape.
    """
    return _select(u, p, images[:, :, ::-1, :], images)


# --------------------------------------------------------------------------
# Colour adjustments (torchvision.transforms.functional on float tensors)
# --------------------------------------------------------------------------

def rgb_to_grayscale(images):
    """ITU-R 601-2 luma, torchvision `rgb_to_grayscale` (PIL `convert('L')`).

    images: (B, H, W, 3) -> (B, H, W, 1).
    """
    w = jnp.asarray(GRAY_WEIGHTS, jnp.float32)
    return jnp.sum(images * w, axis=-1, keepdims=True)


def _blend(images, other, factor):
    """torchvision `_blend`: factor * img + (1 - factor) * other, in [0, 1]."""
    f = _per_image(factor)
    return jnp.clip(f * images + (1.0 - f) * other, 0.0, 1.0)


def adjust_brightness(images, factor):
    """torchvision `adjust_brightness`: blend with black (scale the image).

    images: (B, H, W, C) in [0, 1]; factor: (B,) >= 0. Returns (B, H, W, C).
    """
    return _blend(images, jnp.zeros_like(images), factor)


def adjust_contrast(images, factor):
    """torchvision `adjust_contrast`: blend with the mean grey level.

    The mean of the grayscale image is one scalar per image.
    images: (B, H, W, 3) in [0, 1]; factor: (B,) >= 0. Returns (B, H, W, 3).
    """
    mean = jnp.mean(rgb_to_grayscale(images), axis=(1, 2, 3), keepdims=True)
    return _blend(images, mean, factor)


def adjust_saturation(images, factor):
    """torchvision `adjust_saturation`: blend with the grayscale image.

    images: (B, H, W, 3) in [0, 1]; factor: (B,) >= 0. Returns (B, H, W, 3).
    """
    return _blend(images, rgb_to_grayscale(images), factor)


def _rgb_to_hsv(images):
    """torchvision `_rgb2hsv`, channels last: (..., 3) -> h, s, v each (...)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    maxc = jnp.max(images, axis=-1)
    minc = jnp.min(images, axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    # Grey pixels (max == min) get s = 0 and h = 0 instead of dividing by 0.
    s = cr / jnp.where(eqc, 1.0, maxc)
    cr_div = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    h = jnp.where(maxc == r, bc - gc,
                  jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    """torchvision `_hsv2rgb`: h, s, v each (...) -> (..., 3)."""
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    # The six sectors of the hexcone, selected per pixel without branching.
    r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
    g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
    b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
    return jnp.stack([r, g, b], axis=-1)


def adjust_hue(images, delta):
    """torchvision `adjust_hue`: rotate H in HSV space by `delta` turns.

    images: (B, H, W, 3) in [0, 1]; delta: (B,) in [-0.5, 0.5].
    Returns (B, H, W, 3) in [0, 1].
    """
    h, s, v = _rgb_to_hsv(images)
    h = jnp.mod(h + jnp.asarray(delta, jnp.float32).reshape(-1, 1, 1), 1.0)
    return jnp.clip(_hsv_to_rgb(h, s, v), 0.0, 1.0)


_ADJUSTMENTS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast,
                SATURATION: adjust_saturation, HUE: adjust_hue}


def jitter_order(u):
    """One random permutation of the 4 jitter ops per image.

    torchvision `ColorJitter.get_params` draws `torch.randperm(4)` per call,
    i.e. per image. u: (B, 4) uniforms (their argsort is the permutation).
    Returns int32 (B, 4); row b lists op ids (BRIGHTNESS=0, CONTRAST=1,
    SATURATION=2, HUE=3) in the order they are applied.
    """
    return jnp.argsort(u, axis=1).astype(jnp.int32)


def apply_color_jitter(images, order, brightness=None, contrast=None,
                       saturation=None, hue=None):
    """Apply the jitter ops with given per-image factors in a per-image order.

    The deterministic half of torchvision `ColorJitter.forward`. A factor of
    None skips that op (torchvision skips ops whose strength is 0).

    Args:
      images: (B, H, W, 3) in [0, 1].
      order: int (B, 4) permutations of op ids, e.g. from `jitter_order`.
      brightness, contrast, saturation: (B,) factors or None.
      hue: (B,) shifts in turns or None.
    Returns:
      float32 (B, H, W, 3) in [0, 1].
    """
    factors = {BRIGHTNESS: brightness, CONTRAST: contrast,
               SATURATION: saturation, HUE: hue}
    cheap = [(op, f) for op, f in factors.items() if f is not None and op != HUE]
    order = jnp.asarray(order, jnp.int32)
    x = images.astype(jnp.float32)
    if hue is None:
        return _apply_in_order(x, order, cheap, lambda i: True)
    # Hue (an HSV round trip) costs several times the other three ops
    # together, so it runs once, at each image's own position `hue_at`: the
    # cheap ops placed before it, then hue, then the cheap ops after it.
    hue_at = jnp.argmax(order == HUE, axis=1)
    x = _apply_in_order(x, order, cheap, lambda i: i < hue_at)
    x = adjust_hue(x, hue)
    return _apply_in_order(x, order, cheap, lambda i: i > hue_at)


def _apply_in_order(x, order, ops, at_position):
    """For i = 0..3, apply to each image the op order[:, i] if it is one of
    `ops` ((op id, factors) pairs) and at_position(i) ((B,) bool) holds."""
    if not ops:
        return x

    def step(i, x):
        # Every op is computed and the per-image one selected: a
        # data-dependent order cannot be a Python branch under jit.
        current = order[:, i]
        for op, f in ops:
            chosen = (current == op) & at_position(i)
            x = jnp.where(_per_image(chosen) > 0, _ADJUSTMENTS[op](x, f), x)
        return x

    # A loop rather than 4 unrolled copies: same work at run time, but each
    # op appears once in the program, which quarters its compile time.
    return jax.lax.fori_loop(0, 4, step, x)


def _factor_range(strength: float):
    """torchvision's [max(0, 1 - x), 1 + x] range for a jitter strength x."""
    return max(0.0, 1.0 - strength), 1.0 + strength


def color_jitter(u, images, brightness: float, contrast: float,
                 saturation: float, hue: float, p: float = 1.0):
    """torchvision `RandomApply([ColorJitter(b, c, s, h)], p)`, per image.

    Factors are uniform in [max(0, 1 - x), 1 + x] (hue shift uniform in
    [-h, h], h <= 0.5); the four ops run in an order drawn per image; a
    strength of 0 skips the op. Strengths and p are static Python floats.

    u: (B, 9) uniforms `[apply, 4 order keys, 4 factors]`.
    images: (B, H, W, 3) in [0, 1] -> float32 (B, H, W, 3) in [0, 1].
    """
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue strength must be in [0, 0.5], got {hue}")

    def factor(i, strength, is_hue=False):
        if strength == 0:
            return None
        lo, hi = (-strength, strength) if is_hue else _factor_range(strength)
        return lo + (hi - lo) * u[:, 5 + i]

    jittered = apply_color_jitter(
        images, jitter_order(u[:, 1:5]),
        brightness=factor(BRIGHTNESS, brightness), contrast=factor(CONTRAST, contrast),
        saturation=factor(SATURATION, saturation), hue=factor(HUE, hue, is_hue=True))
    return _select(u[:, 0], p, jittered, images.astype(jnp.float32))


def grayscale(u, images, p: float):
    """torchvision `RandomGrayscale(p)`: grey (3 equal channels) where u < p.

    u: (B,) uniforms; images: (B, H, W, 3) -> float32 (B, H, W, 3).
    """
    gray = jnp.broadcast_to(rgb_to_grayscale(images), images.shape)
    return _select(u, p, gray, images.astype(jnp.float32))


# --------------------------------------------------------------------------
# Gaussian blur
# --------------------------------------------------------------------------

def default_blur_kernel_size(side: int) -> int:
    """Odd integer nearest 10% of the image side, at least 3 (23 at 224 px).

    SimCLR's choice, used for the MoCo v2 blur here (see `gaussian_blur`).
    """
    return max(3, 2 * int(math.floor(0.1 * side / 2)) + 1)


def gaussian_kernel1d(sigma, kernel_size: int):
    """Per-image normalised 1D Gaussian, as torchvision `_get_gaussian_kernel1d`.

    sigma: (B,) -> float32 (B, kernel_size), each row summing to one.
    """
    half = (kernel_size - 1) / 2
    x = jnp.linspace(-half, half, kernel_size, dtype=jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32).reshape(-1, 1)
    pdf = jnp.exp(-0.5 * (x[None, :] / sigma) ** 2)
    return pdf / pdf.sum(axis=1, keepdims=True)


def _blur_axis(images, kernel, axis: int):
    """Convolve along `axis` (1 = H, 2 = W) with per-image kernels (B, K)."""
    k = kernel.shape[1]
    pad = [(0, 0)] * 4
    pad[axis] = (k // 2, k // 2)
    padded = jnp.pad(images, pad, mode='reflect')  # torch 'reflect' (no edge repeat)
    n = images.shape[axis]
    # K shifted slices weighted per image: cheap for K <= ~25 and keeps the
    # per-image kernel without a grouped convolution.
    out = jnp.zeros_like(images)
    for j in range(k):
        window = jax.lax.slice_in_dim(padded, j, j + n, axis=axis)
        out = out + _per_image(kernel[:, j]) * window
    return out


def gaussian_blur(images, sigma, kernel_size: int):
    """Separable Gaussian blur with a per-image sigma and reflect padding.

    Same result as torchvision `F.gaussian_blur(img, [k, k], [s, s])` (2D
    kernel = outer product of the normalised 1D kernels, reflect padding).

    images: (B, H, W, C); sigma: (B,) > 0; kernel_size: static odd int.
    Returns float32 (B, H, W, C).
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    kernel = gaussian_kernel1d(sigma, kernel_size)
    x = images.astype(jnp.float32)
    return _blur_axis(_blur_axis(x, kernel, axis=1), kernel, axis=2)


def blur(u, images, p: float, sigma_range=(0.1, 2.0), kernel_size: Optional[int] = None):
    """MoCo v2 `RandomApply([GaussianBlur([.1, 2.])], p)`, per image.

    sigma ~ U(sigma_range) per image; blurred with probability p. The
    default kernel size is `default_blur_kernel_size(min(H, W))`.
    u: (B, 2) uniforms `[apply, sigma]`; images: (B, H, W, C) -> float32
    (B, H, W, C).
    """
    if kernel_size is None:
        kernel_size = default_blur_kernel_size(min(images.shape[1:3]))
    sigma = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * u[:, 1]
    blurred = gaussian_blur(images, sigma, kernel_size)
    return _select(u[:, 0], p, blurred, images.astype(jnp.float32))


def solarize(u, images, p, threshold: float = 128 / 255):
    """RandomApply([Solarize()], p) of BYOL / MoCo v3: PIL's
    `ImageOps.solarize` (threshold 128) inverts every channel value >= 128,
    v -> 255 - v; on [0, 1] floats x >= 128/255 -> 1 - x.

    u: (B,) uniforms; images: float (B, H, W, C) in [0, 1]; p may be traced.
    """
    return _select(u, p, jnp.where(images >= threshold, 1.0 - images, images), images)


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """torchvision `Normalize(mean, std)`: (x - mean) / std per channel.

    images: (B, H, W, C); mean, std: length C. Returns float32 (B, H, W, C).
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def eval_view(images_uint8, crop_size: int, mean: Sequence[float], std: Sequence[float]):
    """The un-augmented view that evaluation and downstream users feed the
    encoder: uint8 (B, H, W, 3) -> float32 (B, S, S, 3), scaled to [0, 1],
    bilinearly resized to S = crop_size when it differs, normalised."""
    x = images_uint8.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (crop_size, crop_size):
        x = jax.image.resize(x, (x.shape[0], crop_size, crop_size, x.shape[-1]), "linear")
    return normalize(x, mean, std)
