"""The image-folder source, offline, through both host pipelines: grain (the
default) and tf.data (`data_loader='tf'`, when TensorFlow is installed).
Every property is asserted for each: the order, resumption, process shards,
undecodable files, conversions and the config entry points. Each pipeline's
own crop arithmetic is tested in tests/test_grain_images.py and below
(`test_tf_*`).

The folders hold solid-colour images, one colour per file (tests/image_files.py),
so every crop tells which file it came from.
"""
import itertools
import logging
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import default
from moco_jax import data
from moco_jax.core import image_ops
from moco_jax.data.pipelines import grain, tfdata
from moco_jax.data.sources import file_index, image_folder
from moco_jax.data.source import has_module, local_batch_indices
from moco_jax.eval import knn
from image_files import _save, colour, ids_of, imagenette_or_skip
from tiny import knn_arrays, pretrain_source

S = 8  # crop size
needs_tf = pytest.mark.skipif(not has_module("tensorflow"), reason="the tf.data pipeline is optional and "
                              "TensorFlow is not installed (pip install -r requirements-tf.txt)")
LOADERS = [pytest.param("grain"), pytest.param("tf", marks=needs_tf)]


@pytest.fixture(params=LOADERS)
def loader(request):
    return request.param


def stream(loader, paths, n, skip_corrupt=False, **kw):
    """The first n batches of `loader`'s two-crop stream of `paths`."""
    args = dict(global_batch=8, seed=5, crop_size=S, crop_scale=(0.2, 1.0))
    args.update(kw)
    if loader == "grain":
        options = grain.Options(threads=2, skip_corrupt=skip_corrupt)
        batches = grain.two_crop_batches(image_folder.FileImages(np.asarray(paths)), options=options, **args)
    else:
        batches = tfdata.two_crop_batches(paths, num_threads=2, skip_corrupt=skip_corrupt, **args)
    return list(itertools.islice(batches, n))


def center_crops(loader, paths, size, skip_corrupt=False):
    if loader == "grain":
        return grain.center_crops(image_folder.FileImages(np.asarray(paths)), np.arange(len(paths)), size,
                                  options=grain.Options(skip_corrupt=skip_corrupt), chunk=4)
    return tfdata.center_crops(paths, size, skip_corrupt=skip_corrupt)


# --------------------------------------------------------------------------- listing
def test_list_image_files(folder, tmp_path):
    files = image_folder.list_image_files(folder)
    assert files.class_names == ("cat", "dog")
    assert len(files.paths) == 20 and not any(p.endswith(".txt") for p in files.paths)
    np.testing.assert_array_equal(files.labels, [0] * 10 + [1] * 10)
    # Class folders are optional: loose files get NO_LABEL.
    _save(tmp_path / "a.png", 0, fmt="PNG")
    loose = image_folder.list_image_files(tmp_path)
    assert loose.class_names == () and loose.labels.tolist() == [image_folder.NO_LABEL]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder.list_image_files(tmp_path / "missing")


def test_empty_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        image_folder.list_image_files(tmp_path / "empty")


# --------------------------------------------------------------------------- the stream, both pipelines
@pytest.fixture(scope="module")
def full_streams(folder):
    """Per pipeline: 6 steps (3 epochs of 2 steps, 4 images dropped each) of the 20 files."""
    paths = image_folder.list_image_files(folder).paths
    return {p.values[0]: stream(p.values[0], paths, 6) for p in LOADERS
            if p.values[0] == "grain" or has_module("tensorflow")}


def test_two_crops_content_and_conversions(folder, loader):
    files = image_folder.list_image_files(folder)
    batch = stream(loader, files.paths, 1, global_batch=20, num_local_devices=4)[0]
    assert batch.shape == (4, 5, 2, S, S, 3) and batch.dtype == np.uint8
    ids = ids_of(batch).reshape(20, 2)
    np.testing.assert_array_equal(ids[:, 0], ids[:, 1])  # both views of one file
    np.testing.assert_array_equal(np.sort(ids[:, 0]), np.arange(20))  # one epoch, each once
    crops = batch.reshape(20, 2, S, S, 3)
    gray = crops[ids[:, 0] == 3]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # grayscale -> RGB
    rgba = crops[ids[:, 0] == 14].astype(int)
    assert np.abs(rgba.reshape(-1, 3).mean(0) - colour(14)).max() < 2  # alpha dropped, colour kept


def test_order_matches_local_batch_indices_and_reshuffles(folder, full_streams, loader):
    full_stream = full_streams[loader]
    assert full_stream[0].shape == (1, 8, 2, S, S, 3)
    expected = local_batch_indices(20, 8, seed=5)
    epochs = []
    for b in full_stream:
        ids = ids_of(b).reshape(8, 2)[:, 0]
        np.testing.assert_array_equal(ids, next(expected))
        epochs.append(ids)
    assert len(set(np.concatenate(epochs[:2]).tolist())) == 16  # no repeat within an epoch
    assert not np.array_equal(epochs[0], epochs[2])  # reshuffled
    two_dev = stream(loader, image_folder.list_image_files(folder).paths, 1, num_local_devices=2)[0]
    np.testing.assert_array_equal(two_dev.reshape(full_stream[0].shape), full_stream[0])


def test_deterministic_and_resumable(folder, full_streams, loader):
    files = image_folder.list_image_files(folder)
    resumed = stream(loader, files.paths, 3, start_step=3)
    for a, b in zip(full_streams[loader][3:], resumed):
        np.testing.assert_array_equal(a, b)  # same images *and* same crops
    assert not np.array_equal(stream(loader, files.paths, 1, seed=6)[0], full_streams[loader][0])


def test_processes_read_disjoint_shards(folder, full_streams, loader):
    files = image_folder.list_image_files(folder)
    procs = [stream(loader, files.paths, 3, process_index=p, process_count=2) for p in range(2)]
    for step in range(3):
        parts = [ids_of(procs[p][step]).reshape(4, 2)[:, 0] for p in range(2)]
        assert not set(parts[0]) & set(parts[1])
        np.testing.assert_array_equal(np.concatenate(parts), ids_of(full_streams[loader][step]).reshape(8, 2)[:, 0])
        if loader == "grain":  # crops seeded by the global position: also the same crops
            np.testing.assert_array_equal(np.concatenate([procs[0][step], procs[1][step]], axis=1),
                                          full_streams[loader][step])


def test_both_pipelines_read_the_same_images_at_every_step(full_streams):
    if len(full_streams) < 2:
        pytest.skip("the tf.data pipeline is optional and TensorFlow is not installed")
    for a, b in zip(full_streams["grain"], full_streams["tf"]):
        np.testing.assert_array_equal(ids_of(a), ids_of(b))


# --------------------------------------------------------------------------- undecodable files
def test_corrupt_file_error_names_file(corrupt_folder, loader):
    paths = image_folder.list_image_files(corrupt_folder).paths
    with pytest.raises(image_folder.UndecodableImageError, match=r"0[89]\.(jpg|png).*skip_corrupt_images"):
        stream(loader, paths, 2, global_batch=5)  # one epoch: both bad files are in it


def test_corrupt_files_skipped_and_counted(corrupt_folder, caplog, loader):
    paths = image_folder.list_image_files(corrupt_folder).paths
    with caplog.at_level(logging.WARNING):
        batches = stream(loader, paths, 4, global_batch=5, skip_corrupt=True)  # 2 epochs
    skips = [r.getMessage() for r in caplog.records if "skipping undecodable" in r.getMessage()]
    assert len(skips) == 4 and "(4 skipped so far)" in skips[-1]
    named = {Path(word).name for m in skips for word in m.split() if word.endswith((".jpg", ".png"))}
    assert named == {"08.jpg", "09.png"}
    expected = local_batch_indices(10, 5, seed=5)
    for b in batches:
        assert b.shape == (1, 5, 2, S, S, 3)
        ids = ids_of(b, n=10, gray=()).reshape(5, 2)[:, 0]
        want = next(expected)
        good = want < 8
        np.testing.assert_array_equal(ids[good], want[good])  # the rest are in place
        assert set(ids[~good]) <= set(want[good])  # gaps filled from the same batch
    # Skipping is deterministic too: a resumed run sees the same batches.
    resumed = stream(loader, paths, 2, global_batch=5, skip_corrupt=True, start_step=2)
    for a, b in zip(batches[2:], resumed):
        np.testing.assert_array_equal(a, b)


def test_knn_center_crops_corrupt(corrupt_folder, loader):
    paths = image_folder.list_image_files(corrupt_folder).paths
    with pytest.raises(image_folder.UndecodableImageError, match=r"08\.jpg"):
        center_crops(loader, paths, S)
    images, kept = center_crops(loader, paths, S, skip_corrupt=True)
    assert images.shape == (8, S, S, 3) and kept.tolist() == list(range(8))
    np.testing.assert_array_equal(ids_of(images[:, None], n=10, gray=())[:, 0], np.arange(8))


# --------------------------------------------------------------------------- config entry points
def folder_config(root, loader="auto", **overrides):
    config = default.get_config()
    config.update(dict(dataset="image_folder", data_dir=str(root), train_split="", eval_split="",
                       crop_size=S, batch_size=8, input_threads=2, input_workers=0, data_loader=loader,
                       resize_on_device=False))  # the host's crops, which both loaders cut (device: test_device_resize)
    config.update(overrides)
    return config


def test_image_folder_source_from_the_config(folder, full_streams, loader):
    config = folder_config(folder, loader, seed=5, crop_scale=(0.2, 1.0))
    source, batches, steps_per_epoch = pretrain_source(config, num_local_devices=8)
    assert source.loader == loader and source.host_cropped and source.num_train_examples == 20
    assert steps_per_epoch == 2
    first = next(batches)
    assert first.shape == (8, 1, 2, S, S, 3)
    np.testing.assert_array_equal(first.reshape(full_streams[loader][0].shape), full_streams[loader][0])
    with pytest.raises(ValueError, match="eval_split"):
        knn_arrays(config)
    with pytest.raises(FileNotFoundError, match="train_split=''"):
        pretrain_source(folder_config(folder, loader, train_split="train"))


def test_the_default_pipeline_is_grain(folder):
    assert data.open_source(folder_config(folder)).loader == "grain"
    with pytest.raises(ValueError, match="data_loader='bogus' must be one of"):
        data.open_source(folder_config(folder, "bogus"))


def test_the_train_folder_is_listed_once(tmp_path, monkeypatch, loader):
    """Opening the source lists the folder; the stream and the kNN bank of the
    same split reuse that listing (an ImageNet-sized folder takes a while)."""
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                _save(tmp_path / split / cls / f"{i}.png", 4 * c + i, fmt="PNG")
    listed = []
    real = file_index.list_folder
    monkeypatch.setattr(file_index, "list_folder", lambda root: listed.append(str(root)) or real(root))
    config = folder_config(tmp_path, loader, train_split="train", eval_split="val")
    source = data.open_source(config)
    assert listed == [str(tmp_path / "train")]
    assert next(source.train_batches(global_batch=8, seed=0, crop_size=S)).shape == (1, 8, 2, S, S, 3)
    bank = knn.monitor_dataset(source, config)
    assert bank.train_images.shape == bank.test_images.shape == (8, S, S, 3)
    np.testing.assert_array_equal(ids_of(bank.train_images[:, None], n=8, gray=())[:, 0], np.arange(8))
    np.testing.assert_array_equal(bank.train_labels, [0] * 4 + [1] * 4)
    assert listed == [str(tmp_path / "train"), str(tmp_path / "val")]  # the bank reused the listing


@needs_tf
@pytest.mark.slow
def test_resuming_through_another_pipeline_is_logged(tmp_path, caplog):
    """A run moved from a TensorFlow host to one without (data_loader auto ->
    tf there, grain here) resumes, and says that the data stream changed."""
    from moco_jax.training import trainer
    from tiny import tiny_config

    for split, n in (("train", 8), ("val", 2)):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(n):
                _save(tmp_path / "images" / split / cls / f"{i}.png", 8 * c + i, fmt="PNG")
    config = tiny_config(dataset="image_folder", data_dir=str(tmp_path / "images"), train_split="train",
                         eval_split="val", input_workers=0, knn_k=4, lr_schedule="step", log_every_steps=1)
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(tiny_config(**{**config, "data_loader": "tf", "num_train_steps": 1}),
                               workdir=workdir, show_progress=False)
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(tiny_config(**{**config, "num_train_steps": 2}), workdir=workdir,
                                   show_progress=False)
    moved = [r.getMessage() for r in caplog.records if "reading the images through" in r.getMessage()]
    assert len(moved) == 1 and "written reading the images through tf, this run reads them through grain" in moved[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # and once it has saved through grain, no more
        trainer.train_and_evaluate(tiny_config(**{**config, "num_train_steps": 3}), workdir=workdir,
                                   show_progress=False)
    assert not [r for r in caplog.records if "reading the images through" in r.getMessage()]


# --------------------------------------------------------------------------- real images
@pytest.fixture(scope="module")
def imagenette():
    return imagenette_or_skip()


def test_imagenette_sample_pipeline(imagenette, loader):
    files = image_folder.list_image_files(imagenette / "train")
    assert len(files.paths) == 400 and len(files.class_names) == 10
    b = stream(loader, files.paths, 2, global_batch=16, crop_size=224, num_local_devices=2)
    assert b[0].shape == (2, 8, 2, 224, 224, 3)
    views = b[0].reshape(16, 2, 224, 224, 3).astype(np.float32)
    assert views.std() > 30  # real photos
    assert np.abs(views[:, 0] - views[:, 1]).mean() > 5  # two different crops


def test_imagenette_knn_arrays(imagenette, loader):
    config = folder_config(imagenette, loader, train_split="train", eval_split="val", crop_size=32,
                           knn_max_train_images=100)
    ds = knn_arrays(config)
    assert ds.train_images.shape == (100, 32, 32, 3) and ds.test_images.shape == (100, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [10] * 10)
    assert ds.num_classes == 10 and ds.train_labels.max() <= 9
    # Validation classes map to the same indices as the train folders.
    val = image_folder.list_image_files(imagenette / "val")
    assert val.class_names == image_folder.list_image_files(imagenette / "train").class_names
    assert math.isclose(ds.train_images.std(), ds.test_images.std(), rel_tol=0.3)


# --------------------------------------------------------------------------- tf.data's own arithmetic
@pytest.fixture(scope="module")
def tf_ops():
    pytest.importorskip("tensorflow", reason="the tf.data pipeline is optional (pip install -r requirements-tf.txt)")
    from moco_jax.data.pipelines import tf_ops

    return tf_ops


def test_tf_crop_boxes_match_augment_sampler(tf_ops):
    """Host (TF) and device (JAX) RandomResizedCrop boxes are the same
    function of the same uniforms, fallback included."""
    tf = tf_ops.tf
    u = np.random.default_rng(0).uniform(size=(64, 40)).astype(np.float32)
    for (h, w), scale in [((12, 30), (0.08, 1.0)), ((12, 30), (0.5, 1.0)), ((40, 10), (5.0, 6.0))]:
        ref = np.asarray(jax.jit(lambda u: image_ops.crop_boxes(u, h, w, scale, (3 / 4, 4 / 3)))(u))
        got = tf_ops.crop_boxes_from_uniforms(tf.constant(u.reshape(64, 10, 4)), h, w, scale).numpy()
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("size", [12, 48])  # mostly shrinking / always enlarging
def test_tf_host_crop_equals_device_crop_and_resize(tf_ops, size):
    """The host's decode-crop-resize gives the pixels of the device op that
    reproduces torchvision's resized_crop (antialiased bilinear), +-1 rounding."""
    tf = tf_ops.tf
    img = np.random.default_rng(size).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    encoded = tf.io.encode_png(img)
    resize = jax.jit(lambda x, b: image_ops.crop_and_resize(x, b, size))
    for i in range(3):
        seed = tf.constant([7, i], tf.int64)
        crops = tf_ops.two_crops(encoded, seed, size, (0.08, 1.0)).numpy()
        boxes = tf_ops.sample_crop_boxes(seed, 40, 56, (0.08, 1.0)).numpy()
        assert not np.array_equal(boxes[0], boxes[1])
        for v, box in enumerate(boxes):
            ref = np.asarray(resize(img[None] / 255.0, box[None].astype(np.float32)))[0] * 255
            assert np.abs(crops[v] - ref).max() <= 1.0, (size, i, v, box)


def test_tf_two_crops_are_random_resized_crops(tf_ops):
    """A gradient image: crops differ per view and cover >= 20% of the area."""
    tf = tf_ops.tf
    x = np.linspace(0, 255, 64).astype(np.uint8)
    ramp = np.stack(np.broadcast_arrays(x[None, :], x[:, None], x[None, :]), axis=-1)  # R, B: x; G: y
    encoded = tf.io.encode_png(ramp)
    crops = np.stack([tf_ops.two_crops(encoded, tf.constant([1, i], tf.int64), 16, (0.2, 1.0)).numpy()
                      for i in range(8)]).astype(int)
    assert crops.shape == (8, 2, 16, 16, 3)
    spans = crops[..., 0].max(axis=(2, 3)) - crops[..., 0].min(axis=(2, 3))
    assert spans.min() >= 0.3 * 255 and len(np.unique(crops.reshape(16, -1), axis=0)) == 16
    same = tf_ops.two_crops(encoded, tf.constant([1, 0], tf.int64), 16, (0.2, 1.0)).numpy()
    np.testing.assert_array_equal(same, crops[0])  # deterministic per seed


def test_tf_center_crop_resizes_shorter_side(tf_ops):
    # 16 x 32: a left half red, right half blue; the centre 8 x 8 of the
    # 8 x 16 resize is half red, half blue.
    tf = tf_ops.tf
    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :16, 0] = 255
    img[:, 16:, 2] = 255
    out = tf_ops.center_crop(tf.io.encode_png(img), 8).numpy()
    assert out.shape == (8, 8, 3)
    assert out[:, :3, 0].min() == 255 and out[:, 5:, 2].min() == 255
    zoom = tf_ops.center_crop(tf.io.encode_png(img), 8, crop_fraction=0.5).numpy()
    assert zoom.shape == (8, 8, 3)  # 16 x 32 -> centre 8 x 8 of the unchanged image
