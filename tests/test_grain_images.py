"""The grain pipeline's own parts (Pillow, no TensorFlow): the host crops
against the device crop, image modes, reduced JPEG decodes, the crop seeds,
and worker processes. What both pipelines share (order, resumption, shards,
undecodable files, the source from a config) is in tests/test_image_folder.py.

The folders hold solid-colour images, one colour per file (tests/image_files.py),
so every crop tells which file it came from.
"""
import io
import itertools
import logging

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from moco_jax.core import image_ops
from moco_jax.data.pipelines import crop_rule, grain, pillow_ops
from moco_jax.data.sources import image_folder
from image_files import imagenette_or_skip
from tiny import knn_arrays

S = 8  # crop size


def stream(paths, n, workers=0, skip_corrupt=False, **kw):
    args = dict(global_batch=8, seed=5, crop_size=S, crop_scale=(0.2, 1.0))
    args.update(kw)
    options = grain.Options(workers=workers, threads=2, skip_corrupt=skip_corrupt)
    batches = grain.two_crop_batches(image_folder.FileImages(np.asarray(paths)), options=options, **args)
    return list(itertools.islice(batches, n))


def encode(array, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- host crops
def test_crop_boxes_match_augment_sampler():
    """Host (numpy) and device (JAX) RandomResizedCrop boxes are the same
    function of the same uniforms, fallback included."""
    u = np.random.default_rng(0).uniform(size=(64, 40)).astype(np.float32)
    for (h, w), scale in [((12, 30), (0.08, 1.0)), ((12, 30), (0.5, 1.0)), ((40, 10), (5.0, 6.0)),
                          ((375, 500), (0.2, 1.0))]:
        ref = np.asarray(jax.jit(lambda u: image_ops.crop_boxes(u, h, w, scale, (3 / 4, 4 / 3)))(u))
        got = crop_rule.crop_boxes(u.reshape(64, 10, 4), h, w, scale)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("size", [12, 48])  # mostly shrinking / always enlarging
def test_host_crop_equals_device_crop_and_resize(size):
    """Pillow's crop + antialiased bilinear resize (torchvision's resized_crop
    on PIL images) gives the pixels of the device op, +-1 rounding."""
    img = np.random.default_rng(size).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    resize = jax.jit(lambda x, b: image_ops.crop_and_resize(x, b, size))
    for i in range(3):
        u = pillow_ops.example_uniforms(7, i)
        crops = pillow_ops.two_crops(encode(img), u, size, (0.08, 1.0))
        boxes = crop_rule.crop_boxes(u, 40, 56, (0.08, 1.0))
        assert not np.array_equal(boxes[0], boxes[1])
        for v, box in enumerate(boxes):
            ref = np.asarray(resize(img[None] / 255.0, box[None].astype(np.float32)))[0] * 255
            assert np.abs(crops[v] - ref).max() <= 1.001, (size, i, v, box)  # +-1 and float32 rounding


def test_every_image_mode_becomes_rgb():
    rgb = np.zeros((6, 10, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    grey = np.full((6, 10), 90, np.uint8)
    cases = {
        "grey PNG": (encode(grey), (90, 90, 90)),
        "grey JPEG": (encode(grey, "JPEG", quality=100), (90, 90, 90)),
        "RGBA PNG": (encode(np.dstack([rgb, np.full((6, 10), 7, np.uint8)])), (200, 100, 50)),
        "CMYK JPEG": (_cmyk_jpeg(rgb), (200, 100, 50)),
        "palette PNG with transparency": (_palette_png(rgb), (200, 100, 50)),
        "16-bit grey PNG": (_png16(np.full((6, 10), 90 * 256 + 255, np.uint16)), (90, 90, 90)),
        "BMP": (encode(rgb, "BMP"), (200, 100, 50)),
    }
    for name, (encoded, want) in cases.items():
        crops = pillow_ops.two_crops(encoded, pillow_ops.example_uniforms(0, 0), S, (0.5, 1.0))
        assert crops.shape == (2, S, S, 3) and crops.dtype == np.uint8, name
        assert np.abs(crops.reshape(-1, 3).mean(0) - want).max() <= 3, (name, crops.reshape(-1, 3).mean(0))
        centre = pillow_ops.center_crop(encoded, S)
        assert centre.shape == (S, S, 3) and np.abs(centre.reshape(-1, 3).mean(0) - want).max() <= 3, name


def _cmyk_jpeg(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=100)
    return buf.getvalue()


def _palette_png(rgb):
    buf = io.BytesIO()
    image = Image.fromarray(rgb).convert("P")
    image.save(buf, format="PNG", transparency=1)
    return buf.getvalue()


def _png16(grey16):
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    return buf.getvalue()


def test_large_jpeg_decodes_reduced_only_where_the_crops_allow():
    """A 1024 x 768 photo-like JPEG cropped to 32 px: decoded at the smallest
    DCT-domain reduction that keeps the fraction asked for, and the crops
    match the full-size decode."""
    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    img = np.stack([x / 4, y / 3, 128 + 60 * np.sin(x / 40) * np.cos(y / 50)], -1).clip(0, 255).astype(np.uint8)
    encoded = encode(img, "JPEG", quality=95)

    def scale(fraction):
        return pillow_ops.decode(pillow_ops.open_image(encoded), fraction)[1]

    assert scale(0.1) == (1 / 8, 1 / 8)
    assert scale(0.16) == (1 / 4, 1 / 4)  # 1/8 would keep less than 16%
    assert scale(0.6) == (1.0, 1.0)  # a crop that needs more than half: no reduction
    u = pillow_ops.example_uniforms(3, 0)
    reduced = pillow_ops.two_crops(encoded, u, 32, (0.2, 1.0)).astype(int)
    boxes = crop_rule.crop_boxes(u, 768, 1024, (0.2, 1.0))
    reference = np.stack([np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR,
                                                                 box=(b[1], b[0], b[1] + b[3], b[0] + b[2])))
                          for b in boxes]).astype(int)
    assert np.abs(reduced - reference).mean() < 3  # JPEG and DCT scaling, not a different crop


def test_center_crop_resizes_shorter_side():
    # 16 x 32: a left half red, right half blue; the centre 8 x 8 of the
    # 8 x 16 resize is half red, half blue.
    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :16, 0] = 255
    img[:, 16:, 2] = 255
    out = pillow_ops.center_crop(encode(img), 8)
    assert out.shape == (8, 8, 3)
    assert out[:, :3, 0].min() == 255 and out[:, 5:, 2].min() == 255
    zoom = pillow_ops.center_crop(encode(img), 8, crop_fraction=0.5)
    np.testing.assert_array_equal(zoom, img[4:12, 12:20])  # 16 x 32 -> centre 8 x 8 of the unchanged image


# --------------------------------------------------------------------------- the stream
# (The order, resumption, shards and undecodable files of both pipelines:
# tests/test_image_folder.py.)
def test_worker_processes_deliver_the_same_batches(folder):
    files = image_folder.list_image_files(folder)
    for a, b in zip(stream(files.paths, 4), stream(files.paths, 4, workers=2)):
        np.testing.assert_array_equal(a, b)


def test_undecodable_files_in_a_worker_are_skipped_and_counted_here(corrupt_folder, caplog):
    paths = image_folder.list_image_files(corrupt_folder).paths
    with caplog.at_level(logging.WARNING):
        with_worker = stream(paths, 4, workers=1, global_batch=5, skip_corrupt=True)
    skips = [r.getMessage() for r in caplog.records if "skipping undecodable" in r.getMessage()]
    assert len(skips) == 4 and "(4 skipped so far)" in skips[-1]  # counted in the training process
    for a, b in zip(with_worker, stream(paths, 4, global_batch=5, skip_corrupt=True)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(image_folder.UndecodableImageError, match=r"0[89]\.(jpg|png)"):
        stream(paths, 2, workers=1, global_batch=5)


def test_bad_layouts_fail_at_call_time(folder):
    files = image_folder.FileImages(image_folder.list_image_files(folder).paths)
    with pytest.raises(ValueError, match="not divisible"):
        grain.two_crop_batches(files, global_batch=8, seed=0, crop_size=S, crop_scale=(0.2, 1.0),
                               num_local_devices=3)
    with pytest.raises(ValueError, match="exceeds the 20 examples"):
        grain.two_crop_batches(files, global_batch=32, seed=0, crop_size=S, crop_scale=(0.2, 1.0))


def test_uniforms_depend_only_on_seed_and_position():
    u = pillow_ops.stream_uniforms(3, np.arange(100, 164))
    assert u.shape == (64, 2, 10, 4) and u.dtype == np.float32 and 0 <= u.min() and u.max() < 1
    np.testing.assert_array_equal(u[5], pillow_ops.example_uniforms(3, 105))
    assert not np.array_equal(pillow_ops.example_uniforms(4, 105), u[5])
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12 ** -0.5) < 0.01  # uniform on [0, 1)


def folder_config(root, **overrides):
    config = default.get_config()
    config.update(dict(dataset="image_folder", data_dir=str(root), train_split="", eval_split="",
                       crop_size=S, batch_size=8, input_workers=0, input_threads=2))
    config.update(overrides)
    return config


# --------------------------------------------------------------------------- real images
@pytest.fixture(scope="module")
def imagenette():
    return imagenette_or_skip()


def test_imagenette_eval_view_is_torchvisions_resize_and_center_crop(imagenette):
    config = folder_config(imagenette, train_split="train", eval_split="val", crop_size=32,
                           knn_max_train_images=100)
    ds = knn_arrays(config)
    # The same photo, centre-cropped by hand with Pillow from the full-size
    # decode (the source decodes these 224 px JPEGs at 1/4 scale for 32 px).
    val = image_folder.list_image_files(imagenette / "val")
    with Image.open(val.paths[0]) as im:
        im = im.convert("RGB")
        short = min(im.size)
        im = im.resize((round(im.size[0] * 32 / short), round(im.size[1] * 32 / short)), Image.BILINEAR)
        left, top = (im.size[0] - 32) // 2, (im.size[1] - 32) // 2
        diff = ds.test_images[0].astype(int) - np.asarray(im)[top:top + 32, left:left + 32]
        assert np.abs(diff).mean() < 2 and np.abs(diff).max() < 20, (np.abs(diff).mean(), np.abs(diff).max())


# --------------------------------------------------------------------------- the two decoders
def _photo_jpeg(width, height, seed=0, mode="RGB") -> bytes:
    """A noisy photo-like JPEG (quality 95, 4:2:0), ImageNet-sized by default."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, 128 + 60 * np.sin(x / 17) * np.cos(y / 23)], -1)
    img = (img + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)
    return encode(img if mode == "RGB" else img[..., 0], "JPEG", quality=95)


@pytest.mark.skipif(pillow_ops.simplejpeg is None,
                    reason="simplejpeg is not installed (optional: Pillow then decodes every JPEG)")
def test_simplejpeg_and_pillow_give_the_same_crops(monkeypatch, imagenette_photos):
    """With or without simplejpeg, the same pixels: full-size decodes and the
    DCT-reduced ones (Pillow's draft rule), photos, grey JPEGs and the sample
    photos; CMYK JPEGs and undecodable bytes go to Pillow either way."""
    cases = [_photo_jpeg(500, 375), _photo_jpeg(375, 500, 1), _photo_jpeg(1024, 768, 2),
             _photo_jpeg(333, 250, 3, mode="L"), _cmyk_jpeg(np.full((40, 60, 3), 90, np.uint8))]
    cases += imagenette_photos
    truncated = cases[0][:len(cases[0]) // 2]

    def everything():
        out = []
        for i, encoded in enumerate(cases):
            for size, scale in ((224, (0.2, 1.0)), (96, (0.08, 1.0)), (32, (0.2, 1.0))):
                out.append(pillow_ops.two_crops(encoded, pillow_ops.example_uniforms(i, size), size, scale))
            out.append(pillow_ops.center_crop(encoded, 32, 0.875))
        with pytest.raises(OSError, match="truncated") as error:
            pillow_ops.two_crops(truncated, pillow_ops.example_uniforms(0, 0), 224, (0.2, 1.0))
        return out, str(error.value)

    assert pillow_ops.open_image(cases[0]).pil is None  # simplejpeg's
    assert pillow_ops.open_image(cases[4]).pil is not None  # CMYK: Pillow's
    reduced = pillow_ops.decode(pillow_ops.open_image(cases[2]), 0.1)
    assert reduced[0].size == (128, 96) and reduced[1] == (1 / 8, 1 / 8)
    with_simplejpeg = everything()
    monkeypatch.setattr(pillow_ops, "simplejpeg", None)
    assert pillow_ops.open_image(cases[0]).pil is not None
    pillow_only = everything()
    assert with_simplejpeg[1] == pillow_only[1]
    for a, b in zip(with_simplejpeg[0], pillow_only[0]):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def imagenette_photos():
    """Ten of the sample ImageNet photos (some grey), or none without ../shared/data."""
    from image_files import IMAGENETTE
    return [p.read_bytes() for p in sorted((IMAGENETTE / "train").glob("*/*.JPEG"))[::40]]
