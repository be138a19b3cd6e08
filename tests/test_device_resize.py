"""Crops resized on the accelerator (`config.resize_on_device`, grain): the
host decodes each image into a slot (`pillow_ops.views_into`) and the device
cuts and resizes each box (`image_ops.resize_views`), which must give the
host's crops (`pillow_ops.two_crops`, torchvision's resized_crop) within
+-1; the slots travel through the grain stream (chunks, workers, undecodable
images, labels, resumption) and the training step's views function.
"""
import io
import itertools
import math

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from moco_jax import data
from moco_jax.core import augment, image_ops
from moco_jax.data.pipelines import crop_rule, grain, pillow_ops
from moco_jax.data.sources import image_folder
from moco_jax.training import trainer
from image_files import IMAGENETTE
from tiny import tiny_config

SEED = 11


def jpeg(width, height, seed=0, mode="RGB", fmt="JPEG"):
    """A noisy photo-like image (every box crops differently)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float64)
    img = (img + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img if mode == "RGB" else img[..., 0]).save(buf, fmt, **({"quality": 95} if fmt == "JPEG"
                                                                             else {}))
    return buf.getvalue()


def cmyk_jpeg(width, height):
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


CASES = {"500x375": jpeg(500, 375), "375x500": jpeg(375, 500, 1), "1024x768 (DCT-reduced)": jpeg(1024, 768, 2),
         "grey": jpeg(333, 250, 3, mode="L"), "CMYK (Pillow)": cmyk_jpeg(120, 90), "PNG": jpeg(300, 200, 4, fmt="PNG"),
         "600x100 (wider than the canvas)": jpeg(600, 100, 5)}
resize_views = jax.jit(jax.vmap(image_ops.resize_views, in_axes=(None, 1, None), out_axes=1), static_argnums=2)


def device_crops(slots, views, size):
    """uint8 (n, V, S, S, 3): the accelerator's views, rounded as the host rounds."""
    return np.asarray(np.round(resize_views(slots, views, size))).astype(np.uint8)


def slotted(encoded: list[bytes], size, scale, slot, seed=SEED):
    u = pillow_ops.stream_uniforms(seed, np.arange(len(encoded)), 2)
    slots, views = np.empty((len(encoded), slot, 3), np.uint8), np.zeros((len(encoded), 2, 4), np.int32)
    for j, e in enumerate(encoded):
        image = pillow_ops.open_image(e)
        boxes = crop_rule.crop_boxes(u[j], image.height, image.width, scale)
        pillow_ops.views_into(slots[j], views[j], image, boxes, size)
    host = np.stack([pillow_ops.two_crops(e, u[j], size, scale) for j, e in enumerate(encoded)])
    return slots, views, host


@pytest.mark.parametrize("size, scale", [(224, (0.2, 1.0)), (224, (0.08, 1.0)), (32, (0.2, 1.0))])
def test_the_accelerators_crops_are_the_hosts_within_1(size, scale):
    """Every kind of image, decoded whole into its slot or its boxes packed,
    gives on the device the host's crops, +-1."""
    encoded = list(CASES.values()) * 3
    for slot in ((2 * size) ** 2, 2 * size * size + 7):  # the default slot; one too small for most images
        slots, views, host = slotted(encoded, size, scale, slot)
        got = device_crops(slots, views, size)
        assert np.abs(got.astype(int) - host).max() <= 1, (size, scale, slot)
        assert (got != host).mean() < 0.3
    whole = views[:, :, 1] != views[:, :, 3]  # the stride is the image's width, not the box's
    assert not whole.all()


@pytest.mark.parametrize("name, scale, slot, whole", [("500x375", (0.2, 1.0), 448 ** 2, True),
                                                     ("1024x768 (DCT-reduced)", (0.08, 0.15), 600 ** 2, False)])
def test_boxes_are_cut_exactly_from_the_decoded_image(name, scale, slot, whole):
    """The device's cut of each box is the decoded image's window, pixel for
    pixel: the image decoded whole into its slot, or (too large for it)
    its boxes packed one after the other."""
    encoded = CASES[name]
    image = pillow_ops.open_image(encoded)
    boxes = crop_rule.crop_boxes(pillow_ops.example_uniforms(SEED, 0), image.height, image.width, scale)
    assert 224 / boxes[:, 2:].min() > 0.5  # decoded at full size
    pixels = np.asarray(pillow_ops.decode(pillow_ops.open_image(encoded))[0])
    slots, views = np.empty((slot, 3), np.uint8), np.zeros((2, 4), np.int32)
    pillow_ops.views_into(slots, views, image, boxes, 224)
    assert (views[:, 1] == image.width).all() == whole
    side = math.isqrt(slot)
    canvas = np.asarray(image_ops.views_from_slots(np.stack([slots] * 2), views, side))
    for v, (top, left, h, w) in enumerate(boxes.tolist()):
        np.testing.assert_array_equal(canvas[v, :h, :w], pixels[top:top + h, left:left + w])
        assert not canvas[v, h:].any() and not canvas[v, :, w:].any()


def test_a_box_wider_than_the_canvas_is_resized_by_the_host():
    """A 600 px wide image at a 64 px slot side: boxes over 64 px come as the
    host's S x S crop; the others are cut from the packed slot."""
    encoded = [CASES["600x100 (wider than the canvas)"]] * 8
    slots, views, host = slotted(encoded, 32, (0.5, 1.0), 64 ** 2)
    assert (views[:, :, 1] == 32).any()  # resized on the host: a 32 x 32 box of stride 32
    got = device_crops(slots, views, 32)
    assert np.abs(got.astype(int) - host).max() <= 1


@pytest.mark.skipif(pillow_ops.simplejpeg is None,
                    reason="simplejpeg is not installed (optional: Pillow then decodes every JPEG)")
def test_simplejpeg_and_pillow_fill_the_same_slots(monkeypatch):
    """simplejpeg decodes straight into the slot, Pillow's pixels are copied
    in: the slots and views are the same bytes."""
    encoded = list(CASES.values()) + ([p.read_bytes() for p in sorted((IMAGENETTE / "train").glob("*/*.JPEG"))[::60]])
    turbo = slotted(encoded, 64, (0.08, 1.0), 128 ** 2)
    monkeypatch.setattr(pillow_ops, "simplejpeg", None)
    pillow = slotted(encoded, 64, (0.08, 1.0), 128 ** 2)
    for a, b in zip(turbo, pillow):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- the grain stream
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 small noisy JPEGs of several sizes in 4 class folders; one undecodable."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(40):
        folder = root / f"class{i % 4}"
        folder.mkdir(exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(jpeg(40 + 7 * (i % 5), 30 + 5 * (i % 3), i))
    (root / "class1" / "013.jpg").write_bytes(b"\xff\xd8" + b"garbage" * 9)
    return root


S = 16


def photo_files(root, labelled=False):
    table = image_folder.list_image_files(root)
    return image_folder.FileImages(image_folder.file_index.FileTable.from_paths(table.paths, table.labels),
                                   labelled=labelled)


def streams(files, resize_on_device, workers=0, **kw):
    args = dict(global_batch=12, seed=SEED, crop_size=S, crop_scale=(0.2, 1.0), num_local_devices=2)
    args.update(kw)
    options = grain.Options(workers=workers, threads=2, skip_corrupt=True, resize_on_device=resize_on_device)
    return grain.two_crop_batches(files, options=options, **args)


def take(stream, n):
    out = list(itertools.islice(stream, n))
    stream.close()
    return out


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: spawns workers
def test_the_stream_of_slots_gives_the_host_streams_crops(photos, workers, caplog):
    """Over 2 processes, resumed at step 2, labels on: the slots and views,
    resized on the device, are the host stream's crops within +-1, labels
    equal; an undecodable image's place holds its neighbour's slot and views
    (as the host stream's holds its neighbour's crops)."""
    files = photo_files(photos, labelled=True)
    slot = (grain.SLOT_SIDES * S) ** 2
    for process_index in range(2):
        kw = dict(start_step=2, process_index=process_index, process_count=2, labels=True)
        host = take(streams(files, False, **kw), 4)
        device = take(streams(files, True, workers=workers, **kw), 4)
        for (crops, labels), ((slots, views), device_labels) in zip(host, device):
            assert slots.shape == (2, 3, slot, 3) and slots.dtype == np.uint8
            assert views.shape == (2, 3, 2, 4) and views.dtype == np.int32
            np.testing.assert_array_equal(device_labels, labels)
            got = device_crops(slots.reshape(6, slot, 3), views.reshape(6, 2, 4), S)
            assert np.abs(got.astype(int) - crops.reshape(6, 2, S, S, 3)).max() <= 1
    assert any("skipping undecodable" in r.getMessage() for r in caplog.records)


def test_a_resumed_stream_of_slots_is_the_same_bytes(photos):
    files = photo_files(photos)
    whole = take(streams(files, True), 5)
    resumed = take(streams(files, True, start_step=3), 2)
    for (a_slots, a_views), (b_slots, b_views) in zip(whole[3:], resumed):
        np.testing.assert_array_equal(a_slots, b_slots)
        np.testing.assert_array_equal(a_views, b_views)
    assert grain._Steps(files, 12, SEED, 0, 0, 1, S, (0.2, 1.0), slot=32 ** 2,
                        chunk=grain.IMAGES_PER_ELEMENT // 2).element_bytes == 12 * 32 ** 2 * 3


def test_the_default_config_streams_slots_to_the_views_function(photos):
    """The default config (resize_on_device on) streams slots, which the
    step's views function takes (tests/test_no_tensorflow.py trains and
    resumes on them through train.py); with it off, the host's crops."""
    config = tiny_config(dataset="image_folder", data_dir=str(photos), train_split="", eval_split="", crop_size=S,
                         input_workers=0, input_threads=2, skip_corrupt_images=True)
    assert default.get_config().resize_on_device and config.resize_on_device
    batches = trainer.pretrain_batches(data.open_source(config), config, start_step=0)
    slots, views = next(batches)
    batches.close()
    n = jax.local_device_count()
    assert slots.shape == (n, 16 // n, (2 * S) ** 2, 3) and views.shape == (n, 16 // n, 2, 4)
    x_q, x_k = augment.make_views_fn(augment.recipe_from_config(config), True)(
        jax.random.key(0), (slots[0], views[0]))
    assert x_q.shape == x_k.shape == (16 // n, S, S, 3) and np.isfinite(np.asarray(x_q)).all()
    config.resize_on_device = False
    crops = next(trainer.pretrain_batches(data.open_source(config), config, start_step=0))
    assert crops.shape == (n, 16 // n, 2, S, S, 3)


def test_views_of_slots_are_the_views_of_host_crops():
    """The training step's views function: the same recipe draws (flips,
    jitter, blur, ...) on the device's crops as on the host's, so the views
    differ only by the +-1 of the crops."""
    encoded = list(CASES.values())[:4] * 2
    slots, views, host = slotted(encoded, 32, (0.2, 1.0), 64 ** 2)
    recipe = augment.recipe_by_name("moco_v2", crop_size=32)
    fn = jax.jit(augment.make_views_fn(recipe, True))
    rng = jax.random.key(3)
    from_slots = np.asarray(fn(rng, (slots, views)))
    from_crops = np.asarray(fn(rng, host))
    diff = np.abs(from_slots - from_crops)
    assert diff.mean() < 0.01 and np.quantile(diff, 0.999) < 0.1, (diff.mean(), diff.max())
    with pytest.raises(ValueError, match="host-decoded batches"):
        fn(rng, (slots[:, :10].reshape(8, 10, 3, 1), views))
