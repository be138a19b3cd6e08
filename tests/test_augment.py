"""Tests for moco_jax.augment: each op against an independent numpy definition."""
import colorsys
import functools
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moco_jax.core import augment as A
from moco_jax.core import image_ops as ops

KEY = jax.random.PRNGKey(0)


def jitted(fn, *args, **static):
    """fn(*args, **static) compiled as one program.

    Eager JAX compiles every primitive separately, which dominates this
    file's run time; one jit per call is several times faster.
    """
    return jax.jit(functools.partial(fn, **static))(*args)


# The ops take their randomness as uniforms; these draw them from a key, one
# row per image, as the pipelines do for a whole step.
def random_flip(rng, x, p=0.5):
    return ops.flip(jax.random.uniform(rng, (x.shape[0],)), x, p)


def random_grayscale(rng, x, p):
    return ops.grayscale(jax.random.uniform(rng, (x.shape[0],)), x, p)


def color_jitter(rng, x, brightness, contrast, saturation, hue, p=1.0):
    return ops.color_jitter(jax.random.uniform(rng, (x.shape[0], 9)), x, brightness, contrast, saturation, hue, p)


def random_gaussian_blur(rng, x, p, sigma_range=(0.1, 2.0), kernel_size=None):
    return ops.blur(jax.random.uniform(rng, (x.shape[0], 2)), x, p, sigma_range, kernel_size)


def jitter_order(rng, batch_size):
    return ops.jitter_order(jax.random.uniform(rng, (batch_size, 4)))


def random_resized_crop_boxes(rng, batch_size, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    return ops.crop_boxes(jax.random.uniform(rng, (batch_size, 4 * attempts)), height, width, scale, ratio)


# p is an ordinary (traced) argument, so one compile serves every p below.
jitter_04 = jax.jit(lambda rng, x, p: color_jitter(rng, x, 0.4, 0.4, 0.4, 0.1, p))
strong_blur = jax.jit(lambda rng, x, p: random_gaussian_blur(rng, x, p, sigma_range=(1.0, 2.0)))


def rand_images(seed, b=4, h=8, w=8, c=3):
    return np.random.default_rng(seed).uniform(0, 1, (b, h, w, c)).astype(np.float32)


def solid(rgb, b=1, h=4, w=4):
    return jnp.broadcast_to(jnp.asarray(rgb, jnp.float32), (b, h, w, 3))


# ---------------------------------------------------------------- grayscale / colour

@pytest.mark.parametrize("rgb,expected", [((1, 0, 0), 0.299), ((0, 1, 0), 0.587), ((0, 0, 1), 0.114)])
def test_grayscale_weights(rgb, expected):
    g = ops.rgb_to_grayscale(solid(rgb))
    assert g.shape == (1, 4, 4, 1)
    np.testing.assert_allclose(g, expected, atol=1e-6)


def test_brightness():
    x = rand_images(1)
    np.testing.assert_allclose(ops.adjust_brightness(x, jnp.ones(4)), x, atol=1e-7)
    np.testing.assert_array_equal(ops.adjust_brightness(x, jnp.zeros(4)), 0.0)
    f = np.array([0.5, 1.5, 2.0, 0.0], np.float32)
    np.testing.assert_allclose(ops.adjust_brightness(x, f),
                               np.clip(x * f[:, None, None, None], 0, 1), atol=1e-6)


def np_gray(x):
    return x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114


def test_contrast_blends_around_gray_mean():
    x = rand_images(2)
    f = np.array([0.0, 0.5, 1.0, 1.7], np.float32)
    mean = np_gray(x.astype(np.float64)).mean(axis=(1, 2, 3), keepdims=True)
    expected = np.clip(f[:, None, None, None] * x + (1 - f[:, None, None, None]) * mean, 0, 1)
    np.testing.assert_allclose(ops.adjust_contrast(x, f), expected, atol=1e-6)
    # Factor 0: every pixel becomes that image's own mean grey level.
    out0 = np.asarray(ops.adjust_contrast(x, f))[0]
    np.testing.assert_allclose(out0, np.broadcast_to(mean[0], out0.shape), atol=1e-6)


def test_saturation():
    x = rand_images(3)
    out = ops.adjust_saturation(x, jnp.zeros(4))
    np.testing.assert_allclose(out, np.broadcast_to(np_gray(x), x.shape), atol=1e-6)
    np.testing.assert_allclose(ops.adjust_saturation(x, jnp.ones(4)), x, atol=1e-6)
    f = np.float32(1.5)
    expected = np.clip(f * x + (1 - f) * np_gray(x), 0, 1)
    np.testing.assert_allclose(ops.adjust_saturation(x, jnp.full(4, f)), expected, atol=1e-6)


def np_hue(x, delta):
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for idx in np.ndindex(x.shape[1:3]):
            h, s, v = colorsys.rgb_to_hsv(*x[b][idx])
            out[b][idx] = colorsys.hsv_to_rgb((h + delta[b]) % 1.0, s, v)
    return out


def test_hue_against_colorsys():
    x = rand_images(4, b=3, h=5, w=5)
    x[0, 0, 0] = 0.3  # a grey pixel: hue undefined, must stay put
    delta = np.array([0.1, -0.37, 0.5], np.float32)
    np.testing.assert_allclose(jitted(ops.adjust_hue, x, delta), np_hue(x, delta), atol=2e-5)


def test_hue_identities():
    x = rand_images(5)

    def shifts(y, d):
        half = ops.adjust_hue(y, d)
        return ops.adjust_hue(y, 0 * d), ops.adjust_hue(half, -d), ops.adjust_hue(half, d), half

    zero, back, twice, half = jitted(shifts, x, jnp.full(4, 0.5))
    np.testing.assert_allclose(zero, x, atol=1e-5)
    # +0.5 then -0.5 (or +0.5 twice) is a whole turn: the identity...
    np.testing.assert_allclose(back, x, atol=1e-5)
    np.testing.assert_allclose(twice, x, atol=1e-5)
    # ...but a half turn alone is not.
    assert np.abs(np.asarray(half) - x).max() > 0.1


def test_hue_third_turn_maps_red_to_green_to_blue():
    red = solid((1, 0, 0))
    third = jnp.full(1, 1 / 3)
    green = ops.adjust_hue(red, third)
    np.testing.assert_allclose(green, solid((0, 1, 0)), atol=1e-5)
    np.testing.assert_allclose(ops.adjust_hue(green, third), solid((0, 0, 1)), atol=1e-5)


# ---------------------------------------------------------------- colour jitter

def test_jitter_order_is_per_image_permutation():
    order = np.asarray(jitter_order(KEY, 64))
    assert order.shape == (64, 4)
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (64, 1)))
    # 64 images, 24 possible orders: many distinct orders must show up.
    assert len({tuple(r) for r in order}) > 10
    np.testing.assert_array_equal(order, jitter_order(KEY, 64))


def test_apply_color_jitter_respects_order():
    x = rand_images(6, b=2)
    b, c = np.array([1.6, 1.6], np.float32), np.array([0.3, 0.3], np.float32)
    # Image 0: brightness then contrast; image 1: contrast then brightness.
    order = jnp.array([[0, 1, 2, 3], [1, 0, 2, 3]])
    out = np.asarray(jitted(ops.apply_color_jitter, x, order, b, c))

    def bright(img, f):
        return np.clip(img * f, 0, 1)

    def contrast(img, f):
        return np.clip(f * img + (1 - f) * np_gray(img).mean(), 0, 1)

    np.testing.assert_allclose(out[0], contrast(bright(x[0], 1.6), 0.3), atol=1e-5)
    np.testing.assert_allclose(out[1], bright(contrast(x[1], 0.3), 1.6), atol=1e-5)
    # Same image, same factors, other order: a different result.
    swapped = np.asarray(ops.apply_color_jitter(x[:1], order[1:], brightness=b[:1], contrast=c[:1]))
    assert np.abs(swapped[0] - out[0]).max() > 1e-2


def test_apply_color_jitter_all_ops_any_order_matches_sequential():
    """Hue is applied once at its own position (not evaluated at all four);
    the result must equal applying the four ops one after the other."""
    x = rand_images(9, b=24, h=4, w=4)
    rng = np.random.default_rng(0)
    order = np.array(list(itertools.permutations(range(4))), np.int32)  # all 24 orders
    f = {op: rng.uniform(0.6, 1.4, 24).astype(np.float32) for op in (ops.BRIGHTNESS, ops.CONTRAST, ops.SATURATION)}
    f[ops.HUE] = rng.uniform(-0.1, 0.1, 24).astype(np.float32)
    out = np.asarray(jitted(ops.apply_color_jitter, x, order, f[0], f[1], f[2], f[3]))
    for b in range(24):
        ref = x[b:b + 1]
        for op in order[b]:
            ref = ops._ADJUSTMENTS[op](ref, f[op][b:b + 1])
        np.testing.assert_allclose(out[b], np.asarray(ref)[0], atol=1e-5)


def test_color_jitter_p0_is_identity_and_zero_strength_skips():
    x = rand_images(7, b=32, h=4, w=4)
    np.testing.assert_array_equal(jitter_04(KEY, x, 0.0), x)
    np.testing.assert_allclose(color_jitter(KEY, x, 0.0, 0.0, 0.0, 0.0, p=1.0), x, atol=1e-7)


def test_color_jitter_brightness_only_factor_range():
    x = np.full((64, 2, 2, 3), 0.5, np.float32)
    out = np.asarray(jitted(color_jitter, KEY, x, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0))
    factors = out[:, 0, 0, 0] / 0.5
    # Each pixel of an image scaled by the same factor, drawn in [0.6, 1.4].
    np.testing.assert_allclose(out, np.broadcast_to(out[:, :1, :1, :1], out.shape), atol=1e-6)
    assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
    assert factors.max() - factors.min() > 0.4  # genuinely random per image


def test_color_jitter_p_applies_per_image():
    x = rand_images(8, b=32, h=4, w=4)
    out = np.asarray(jitter_04(KEY, x, 0.5))
    changed = np.abs(out - x).reshape(32, -1).max(axis=1) > 1e-6
    assert 0 < changed.sum() < 32


def test_random_grayscale():
    x = rand_images(9, b=32, h=4, w=4)
    np.testing.assert_array_equal(random_grayscale(KEY, x, 0.0), x)
    np.testing.assert_allclose(random_grayscale(KEY, x, 1.0),
                               np.broadcast_to(np_gray(x), x.shape), atol=1e-6)
    out = np.asarray(random_grayscale(KEY, x, 0.5))
    is_gray = np.all(np.abs(out - out[..., :1]) < 1e-7, axis=(1, 2, 3))
    assert 0 < is_gray.sum() < 32


# ---------------------------------------------------------------- blur

def test_gaussian_kernel_sums_to_one_and_matches_definition():
    sigma = jnp.array([0.1, 0.7, 2.0])
    k = np.asarray(ops.gaussian_kernel1d(sigma, 7))
    np.testing.assert_allclose(k.sum(axis=1), 1.0, atol=1e-6)
    xs = np.arange(-3, 4)
    ref = np.exp(-0.5 * (xs / 0.7) ** 2)
    np.testing.assert_allclose(k[1], ref / ref.sum(), atol=1e-6)


def test_default_blur_kernel_size():
    assert ops.default_blur_kernel_size(224) == 23
    assert ops.default_blur_kernel_size(96) == 9
    assert ops.default_blur_kernel_size(32) == 3
    assert ops.default_blur_kernel_size(8) == 3


def test_blur_matches_2d_reflect_convolution():
    x = rand_images(10, b=2, h=9, w=7)
    sigma = np.array([0.8, 1.7], np.float32)
    k = 5
    out = np.asarray(jitted(ops.gaussian_blur, x, sigma, kernel_size=k))
    for b in range(2):
        t = np.arange(k) - k // 2
        g = np.exp(-0.5 * (t / sigma[b]) ** 2)
        g /= g.sum()
        k2 = np.outer(g, g)
        p = np.pad(x[b], ((2, 2), (2, 2), (0, 0)), mode="reflect")
        ref = np.zeros_like(x[b])
        for i in range(k):
            for j in range(k):
                ref += k2[i, j] * p[i:i + 9, j:j + 7]
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_blur_constant_is_identity_and_sigma_spreads_impulse():
    const = np.full((2, 8, 8, 3), 0.37, np.float32)
    np.testing.assert_allclose(jitted(ops.gaussian_blur, const, jnp.array([0.5, 2.0]), kernel_size=5), const, atol=1e-6)
    imp = np.zeros((2, 11, 11, 1), np.float32)
    imp[:, 5, 5] = 1.0
    out = np.asarray(jitted(ops.gaussian_blur, imp, jnp.array([0.5, 2.0]), kernel_size=7))
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), 1.0, atol=1e-5)  # mass kept
    r2 = (np.arange(11) - 5)[:, None] ** 2 + (np.arange(11) - 5)[None, :] ** 2
    spread = (out[..., 0] * r2).sum(axis=(1, 2))
    assert out[0, 5, 5, 0] > out[1, 5, 5, 0] and spread[1] > 2 * spread[0]


def test_random_gaussian_blur_p():
    x = rand_images(11, b=16)
    np.testing.assert_array_equal(strong_blur(KEY, x, 0.0), x)
    # sigma >= 1 so every image visibly blurs (sigma 0.1 is nearly a delta).
    out = np.asarray(strong_blur(KEY, x, 1.0))
    assert np.all(np.abs(out - x).reshape(16, -1).max(axis=1) > 1e-2)
    assert out.std() < x.std()
    half = np.asarray(strong_blur(KEY, x, 0.5))
    blurred = np.abs(half - x).reshape(16, -1).max(axis=1) > 1e-2
    assert 0 < blurred.sum() < 16
    np.testing.assert_array_equal(half[~blurred], x[~blurred])


# ---------------------------------------------------------------- crop / flip

def test_crop_boxes_inside_and_in_range():
    h, w = 20, 30
    boxes = np.asarray(jitted(random_resized_crop_boxes, KEY, batch_size=512, height=h, width=w, scale=(0.2, 1.0)))
    assert boxes.shape == (512, 4) and boxes.dtype == np.float32
    top, left, ch, cw = boxes.T
    np.testing.assert_array_equal(boxes, np.round(boxes))  # integer pixels
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(ch >= 1) and np.all(cw >= 1)
    assert np.all(top + ch <= h) and np.all(left + cw <= w)
    # w = round(sqrt(A r)), h = round(sqrt(A / r)) pin A and r to intervals
    # that must meet the sampling ranges.
    assert np.all((cw + 0.5) * (ch + 0.5) >= 0.2 * h * w)
    assert np.all((cw - 0.5) * (ch - 0.5) <= 1.0 * h * w)
    assert np.all((cw + 0.5) / (ch - 0.5) >= 3 / 4) and np.all((cw - 0.5) / (ch + 0.5) <= 4 / 3)
    # Offsets spread over the valid range (not always 0 or centred).
    assert len(np.unique(top)) > 5 and len(np.unique(left)) > 5


def torchvision_get_params(u, height, width, scale, ratio):
    """RandomResizedCrop.get_params, line by line, with torch.rand replaced by u."""
    area = height * width
    for a_u, r_u, t_u, l_u in u.reshape(-1, 4):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * a_u)
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r_u)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(t_u * (height - h + 1))  # torch.randint(0, height - h + 1)
            j = int(l_u * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# On 12 x 30, scale (0.5, 1) needs h = sqrt(A / r) >= 11.6: often no attempt fits.
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)])
def test_crop_boxes_match_torchvision_loop(scale):
    h, w = 12, 30
    u = np.random.default_rng(0).uniform(size=(64, 40)).astype(np.float32)
    boxes = np.asarray(jax.jit(lambda u: ops.crop_boxes(u, h, w, scale, (3 / 4, 4 / 3)))(u))
    expected = np.array([torchvision_get_params(r.astype(np.float64), h, w, scale, (3 / 4, 4 / 3))
                         for r in u])
    np.testing.assert_array_equal(boxes, expected)
    fallback = np.all(expected == [0, 7, 12, 16], axis=1)  # central 12 x round(12 * 4/3)
    if scale[0] == 0.5:
        assert 0 < fallback.sum() < 64  # both branches exercised


def test_crop_boxes_fallback_is_torchvision_central_crop():
    # scale far above 1 can never fit: torchvision's fallback with ratio clamp.
    wide = np.asarray(random_resized_crop_boxes(KEY, 4, 10, 40, scale=(5.0, 6.0)))
    np.testing.assert_array_equal(wide, np.tile([0, 13, 10, 13], (4, 1)))  # w = round(10 * 4/3)
    tall = np.asarray(random_resized_crop_boxes(KEY, 4, 40, 10, scale=(5.0, 6.0)))
    np.testing.assert_array_equal(tall, np.tile([13, 0, 13, 10], (4, 1)))  # h = round(10 / 0.75), top = (40 - 13) // 2
    sq = np.asarray(random_resized_crop_boxes(KEY, 4, 12, 12, scale=(5.0, 6.0)))
    np.testing.assert_array_equal(sq, np.tile([0, 0, 12, 12], (4, 1)))


def test_crop_boxes_deterministic_per_key():
    a = random_resized_crop_boxes(KEY, 16, 32, 32)
    b = random_resized_crop_boxes(KEY, 16, 32, 32)
    c = random_resized_crop_boxes(jax.random.PRNGKey(1), 16, 32, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in np.asarray(a)}) > 1  # per-image boxes


def test_crop_and_resize_full_box_identity():
    x = rand_images(12, b=2, h=8, w=8)
    boxes = jnp.array([[0, 0, 8, 8]] * 2, jnp.float32)
    out = ops.crop_and_resize(x, boxes, 8)
    assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_crop_and_resize_full_box_matches_jax_image():
    x = rand_images(13, b=1, h=12, w=12)
    box = jnp.array([[0, 0, 12, 12]], jnp.float32)
    for size in (5, 20):  # down- and up-sampling
        ref = jax.jit(lambda im, s=size: jax.image.scale_and_translate(
            im, (s, s, 3), (0, 1), jnp.full(2, s / 12), jnp.zeros(2),
            method="linear", antialias=True))(jnp.asarray(x[0]))
        np.testing.assert_allclose(jitted(ops.crop_and_resize, x, box, size=size)[0], ref, atol=1e-5)


def np_aa_resize_1d(n_in, n_out):
    """torchvision/PIL antialiased bilinear weights, written as in torchvision's loop."""
    scale = n_in / n_out
    support = scale if scale >= 1 else 1.0
    inv = 1 / scale if scale >= 1 else 1.0
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        xmin = max(int(centre - support + 0.5), 0)
        xmax = min(int(centre + support + 0.5), n_in)
        for j in range(xmin, xmax):
            W[i, j] = max(0.0, 1 - abs((j - centre + 0.5) * inv))
        W[i] /= W[i].sum()
    return W


def test_crop_and_resize_equals_crop_then_resize():
    x = rand_images(14, b=2, h=16, w=16)
    boxes = np.array([[3, 2, 11, 7], [0, 5, 4, 9]], np.float32)
    out = np.asarray(jitted(ops.crop_and_resize, x, boxes, size=6))
    for b, (t, l, h, w) in enumerate(boxes.astype(int)):
        crop = x[b, t:t + h, l:l + w]
        ref = np.einsum("oh,hwc,pw->opc", np_aa_resize_1d(h, 6), crop, np_aa_resize_1d(w, 6))
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_flip():
    x = rand_images(15)
    np.testing.assert_array_equal(random_flip(KEY, x, p=1.0), x[:, :, ::-1])
    np.testing.assert_array_equal(random_flip(KEY, x, p=0.0), x)
    out = np.asarray(random_flip(KEY, rand_images(15, b=32, h=2, w=2), p=0.5))
    ref = rand_images(15, b=32, h=2, w=2)
    flipped = [np.array_equal(o, r[:, ::-1]) for o, r in zip(out, ref)]
    same = [np.array_equal(o, r) for o, r in zip(out, ref)]
    assert all(f or s for f, s in zip(flipped, same)) and 0 < sum(flipped) < 32


def test_normalize():
    x = rand_images(16)
    out = ops.normalize(x, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    np.testing.assert_allclose(out, (x - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0]),
                               atol=1e-6)


# ---------------------------------------------------------------- recipes / views

def test_recipes():
    v1, v2, c = A.moco_v1_recipe(), A.moco_v2_recipe(), A.cifar_recipe()
    assert (v1.crop_size, v1.crop_scale, v1.hue, v1.jitter_p, v1.blur_p) == (224, (0.2, 1.0), 0.4, 1.0, 0.0)
    assert v1.order == ("grayscale", "jitter", "flip")
    assert (v2.hue, v2.jitter_p, v2.grayscale_p, v2.blur_p, v2.blur_sigma) == (0.1, 0.8, 0.2, 0.5, (0.1, 2.0))
    assert v2.order == ("jitter", "grayscale", "blur", "flip")
    assert v1.mean == v2.mean == (0.485, 0.456, 0.406) and v2.std == (0.229, 0.224, 0.225)
    assert (c.crop_size, c.crop_scale, c.blur_p) == (32, (0.08, 1.0), 0.0)
    assert c.mean == (0.4914, 0.4822, 0.4465) and c.std == (0.2023, 0.1994, 0.2010)
    r = A.recipe_by_name("moco_v2", 16, blur_p=0.0)
    assert r.crop_size == 16 and r.blur_p == 0.0 and r.hue == 0.1
    assert A.recipe_by_name("cifar") == c
    with pytest.raises(ValueError):
        A.recipe_by_name("simclr")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v1.crop_size = 3
    hash(v2)  # usable as a static jit argument


def uint8_images(b=4, h=20, w=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["moco_v1", "cifar"])  # moco_v2: see two_views test
def test_augment_view_range_and_shape(name):
    recipe = A.recipe_by_name(name, 12)
    imgs = uint8_images()
    out = jitted(A.augment_view, KEY, imgs, recipe=recipe)
    assert out.shape == (4, 12, 12, 3) and out.dtype == jnp.float32
    # Undo normalisation: the pre-normalisation values must lie in [0, 1].
    raw = np.asarray(out) * np.array(recipe.std) + np.array(recipe.mean)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_augment_view_identity_recipe():
    # Everything off and full-image crop: just /255 and normalise.
    recipe = dataclasses.replace(A.moco_v2_recipe(20), crop_scale=(1.0, 1.0), flip=False,
                                 jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    imgs = uint8_images(h=20, w=20)
    # Square image, area 1: only ratio 1 fits, so the box is the whole image.
    out = A.augment_view(KEY, imgs, recipe)
    np.testing.assert_allclose(out, imgs / 255.0, atol=1e-6)
    np.testing.assert_allclose(A.augment_view(KEY, imgs, recipe, crop=False), imgs / 255.0, atol=1e-6)
    with pytest.raises(ValueError):
        A.augment_view(KEY, uint8_images(h=8, w=8), recipe, crop=False)


def test_two_views_jit_and_determinism():
    recipe = A.recipe_by_name("moco_v2", 12)
    imgs = uint8_images()
    f = jax.jit(A.two_views, static_argnums=(2, 3))
    q, k = f(KEY, imgs, recipe, True)
    assert q.shape == k.shape == (4, 12, 12, 3) and q.dtype == k.dtype == jnp.float32
    assert np.abs(np.asarray(q) - np.asarray(k)).max() > 0.1
    q2, k2 = f(KEY, imgs, recipe, True)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(k, k2)
    q3, _ = f(jax.random.PRNGKey(7), imgs, recipe, True)
    assert not np.array_equal(q, q3)
    for view in (q, k):  # pre-normalisation values lie in [0, 1]
        raw = np.asarray(view) * np.array(recipe.std) + np.array(recipe.mean)
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_two_views_pmap_8_devices():
    n = jax.device_count()
    assert n == 8
    recipe = A.recipe_by_name("cifar", 8)
    imgs = uint8_images(b=n * 2, h=8, w=8).reshape(n, 2, 8, 8, 3)
    keys = jax.random.split(KEY, n)
    q, k = jax.pmap(lambda r, x: A.two_views(r, x, recipe, crop=False))(keys, imgs)
    assert q.shape == k.shape == (n, 2, 8, 8, 3) and q.dtype == jnp.float32
    # Each device has its own key, so no two devices produce the same view.
    flat = np.asarray(q).reshape(n, -1)
    assert len({row.tobytes() for row in flat}) == n
    assert np.isfinite(flat).all()


# ---------------------------------------------------------------- make_views_fn

def test_make_views_fn_whole_images_is_two_views():
    # Crop + flip only: the point is the wiring, and colour ops compile slowly.
    recipe = dataclasses.replace(A.recipe_by_name("cifar", 8), jitter_p=0.0, grayscale_p=0.0)
    imgs = uint8_images(h=12, w=12)
    views = jax.jit(A.make_views_fn(recipe, host_cropped=False))
    q, k = views(KEY, imgs)
    q2, k2 = jax.jit(A.two_views, static_argnums=(2, 3))(KEY, imgs, recipe, True)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(k, k2)


def test_make_views_fn_host_cropped():
    # Identity recipe: each view is exactly its own host crop, normalised.
    identity = dataclasses.replace(A.moco_v2_recipe(8), flip=False, jitter_p=0.0, grayscale_p=0.0,
                                   blur_p=0.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    crops = np.random.default_rng(3).integers(0, 256, (4, 2, 8, 8, 3), dtype=np.uint8)
    q, k = jax.jit(A.make_views_fn(identity, host_cropped=True))(KEY, crops)
    assert q.shape == k.shape == (4, 8, 8, 3) and q.dtype == jnp.float32
    np.testing.assert_allclose(q, (crops[:, 0] / 255.0 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(k, (crops[:, 1] / 255.0 - 0.5) / 0.5, atol=1e-6)
    # The full recipe: deterministic per key, independent per view, in range.
    recipe = A.recipe_by_name("moco_v2", 8)
    views = jax.jit(A.make_views_fn(recipe, host_cropped=True))
    same = np.broadcast_to(crops[:, :1], crops.shape)  # both crops identical
    q1, k1 = views(KEY, same)
    q2, _ = views(KEY, same)
    np.testing.assert_array_equal(q1, q2)
    assert np.abs(np.asarray(q1) - np.asarray(k1)).max() > 0.1  # views augmented independently
    raw = np.asarray(q1) * np.array(recipe.std) + np.array(recipe.mean)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="host-cropped"):
        views(KEY, crops[:, 0])


def test_make_views_fn_host_cropped_pmap():
    n = jax.device_count()
    recipe = A.recipe_by_name("cifar", 8)
    crops = np.random.default_rng(4).integers(0, 256, (n, 2, 2, 8, 8, 3), dtype=np.uint8)
    q, k = jax.pmap(A.make_views_fn(recipe, host_cropped=True))(jax.random.split(KEY, n), crops)
    assert q.shape == k.shape == (n, 2, 8, 8, 3)
    assert len({row.tobytes() for row in np.asarray(q).reshape(n, -1)}) == n


def test_solarize_is_pils():
    """ImageOps.solarize (threshold 128) on every uint8 value, through [0, 1] floats."""
    from PIL import Image, ImageOps

    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    expected = np.asarray(ImageOps.solarize(Image.fromarray(values[0])))
    out = ops.solarize(jnp.zeros((1,)), jnp.asarray(values, jnp.float32) / 255.0, 1.0)
    np.testing.assert_allclose(np.asarray(out[0]) * 255.0, expected, atol=1e-4)
    floats = jnp.asarray(values, jnp.float32) / 255.0
    kept = ops.solarize(jnp.ones((1,)) * 0.9, floats, 0.5)  # u >= p: unchanged
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(floats))


def test_moco_v3_views_are_asymmetric():
    """moco-v3: blur p 1.0 / 0.1 and solarisation p 0 / 0.2. Seen through a
    recipe with only solarisation on: on images of value 200 (>= 128) view 1
    is never solarised and view 2 about as often as its p says."""
    v3 = A.recipe_by_name("moco_v3")
    assert (v3.view_probabilities(0), v3.view_probabilities(1)) == ((1.0, 0.0), (0.1, 0.2))
    assert (v3.saturation, v3.crop_scale, v3.order[-2:]) == (0.2, (0.08, 1.0), ("solarize", "flip"))
    assert A.recipe_by_name("cifar_v3").view_probabilities(1) == (0.0, 0.2)
    only_solarize = dataclasses.replace(v3, crop_size=8, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip=False,
                                        solarize_p=(0.0, 0.3), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images = jnp.full((2000, 8, 8, 3), 200, jnp.uint8)
    x1, x2 = A.two_views(jax.random.key(0), images, only_solarize)
    solarized = lambda x: np.asarray(x[:, 0, 0, 0]) < 0.5  # noqa: E731 - 200/255 -> 55/255
    assert not solarized(x1).any()
    assert abs(solarized(x2).mean() - 0.3) < 0.04
    # The recipes without solarisation draw the uniforms they always drew.
    assert A._uniform_columns(A.recipe_by_name("moco_v2")) == A._UNIFORMS
