"""The labelled streams of every source (issue 32): `labelled_train_batches`
(one crop per image with its label, in the pretraining order, resumable,
each process its share) and `eval_batches` (the evaluation view, in order,
padded to whole steps, the same number of steps on every process), against
`labelled_arrays` and `local_batch_indices`.

Image folders go through grain and, with TensorFlow installed, tf.data; the
tiny tensorflow-datasets dataset through grain (ArrayRecord) and tf.data
(TFRecord). The images are solid colours, one per file (tests/image_files.py),
so every crop tells which file it came from.
"""
import itertools
import logging
import shutil

import numpy as np
import pytest

from configs import default
from moco_jax import data
from moco_jax.data.pipelines import crop_rule, pillow_ops
from moco_jax.data.source import (ArrayDataset, UndecodableImageError, has_module, knn_subset, local_batch_indices,
                                  num_eval_steps)
from moco_jax.data.sources.arrays import ArraySource
from image_files import _save, ids_of

S = 8  # crop / evaluation size
FRACTION = 0.875
needs_tf = pytest.mark.skipif(not has_module("tensorflow"), reason="the tf.data pipeline is optional and "
                              "TensorFlow is not installed (pip install -r requirements-tf.txt)")
LOADERS = [pytest.param("grain"), pytest.param("tf", marks=needs_tf)]

# train/{cat,dog,emu} and val/{dog,emu}: file ids and the train class of each.
TRAIN = {"cat": range(0, 5), "dog": range(5, 9), "emu": range(9, 13)}
VAL = {"dog": range(13, 16), "emu": range(16, 20)}
CLASS = {i: c for classes in (TRAIN, VAL) for c, name in enumerate(("cat", "dog", "emu"))
         for i in classes.get(name, ())}
N_IDS = 20


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """data_dir/train/<class>/ and data_dir/val/<class>/, images of several
    sizes and formats; val lacks the class 'cat', so its labels must be
    mapped to the train classes by name."""
    root = tmp_path_factory.mktemp("splits")
    for split, classes in (("train", TRAIN), ("val", VAL)):
        for name, ids in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in ids:
                fmt, ext = ("JPEG", "jpg") if i % 3 == 0 else ("PNG", "png")
                _save(root / split / name / f"{i:02d}.{ext}", i, fmt=fmt, size=(16 + 3 * (i % 4), 12 + 2 * (i % 3)))
    return root


@pytest.fixture(scope="module")
def corrupt_splits(corrupt_folder, tmp_path_factory):
    """The corrupt folder's 10 files as train/a (00..04), train/b (05..09,
    with the truncated 08.jpg and the garbage 09.png); val is the same."""
    root = tmp_path_factory.mktemp("corrupt_splits")
    for split in ("train", "val"):
        for name, ids in (("a", range(5)), ("b", range(5, 10))):
            (root / split / name).mkdir(parents=True)
            for f in sorted(corrupt_folder.iterdir()):
                if int(f.stem) in ids:
                    shutil.copy(f, root / split / name / f.name)
    return root


def folder_source(root, loader="grain", **overrides):
    config = default.get_config()
    config.update(dict(dataset="image_folder", data_dir=str(root), train_split="train", eval_split="val",
                       crop_size=S, input_threads=2, input_workers=0, data_loader=loader))
    config.update(overrides)
    return data.open_source(config)


def eval_rows(source, processes=2, devices=2, **kw):
    """eval_batches of every process: (images, labels) of the valid rows in
    stream order (step by step, process by process), and the step counts."""
    args = dict(size=S, crop_fraction=FRACTION, global_batch=8)
    args.update(kw)
    per_process = [list(source.eval_batches(process_index=p, process_count=processes, num_local_devices=devices,
                                            **args)) for p in range(processes)]
    counts = [len(steps) for steps in per_process]
    images, labels = [], []
    for step in zip(*per_process):
        for x, y, valid in step:
            b = args["global_batch"] // processes // devices
            assert x.shape == (devices, b, *x.shape[2:]) and x.dtype == np.uint8
            assert y.shape == valid.shape == (devices, b) and y.dtype == np.int32 and valid.dtype == bool
            assert not x[~valid].any() and not y[~valid].any()  # padding: zeros, label 0
            images.append(x[valid])
            labels.append(y[valid])
    return np.concatenate(images), np.concatenate(labels), counts


def train_steps(source, n, processes=1, process_index=0, devices=2, **kw):
    args = dict(global_batch=8, seed=5, crop_size=S, crop_scale=(0.2, 1.0))
    args.update(kw)
    return list(itertools.islice(source.labelled_train_batches(
        process_index=process_index, process_count=processes, num_local_devices=devices, **args), n))


# --------------------------------------------------------------------------- image folders
@pytest.mark.parametrize("loader", LOADERS)
def test_folder_eval_batches_are_labelled_arrays(splits, loader):
    """Over both processes and their devices, the valid rows are exactly the
    labelled arrays (bit-identical, in order); every process runs ceil(M / G)
    steps, the last padded."""
    source = folder_source(splits, loader)
    assert source.num_classes() == 3
    assert source.num_labelled("val") == 7 and source.num_labelled() == 13 and source.num_labelled("", 9, 3) == 9
    arrays = source.labelled_arrays(size=S, crop_fraction=FRACTION, max_train_images=9, seed=3)
    test_images, test_labels, counts = eval_rows(source, split="val", global_batch=4)
    assert counts == [num_eval_steps(7, 4)] * 2 == [2, 2]
    np.testing.assert_array_equal(test_images, arrays.test_images)
    np.testing.assert_array_equal(test_labels, arrays.test_labels)
    np.testing.assert_array_equal(test_labels, [CLASS[i] for i in range(13, 20)])  # mapped by class name
    train_images, train_labels, counts = eval_rows(source, split="train", global_batch=4, max_images=9, seed=3)
    assert counts == [3, 3]  # process 1's last step is all padding, and still runs
    np.testing.assert_array_equal(train_images, arrays.train_images)
    np.testing.assert_array_equal(train_labels, arrays.train_labels)
    # One process, one device: the same rows.
    alone, _, counts = eval_rows(source, processes=1, devices=1, split="val", global_batch=4)
    assert counts == [2]
    np.testing.assert_array_equal(alone, arrays.test_images)


@pytest.mark.parametrize("loader", LOADERS)
def test_folder_labelled_train_batches(splits, loader):
    """The order of local_batch_indices over the capped subset, each process
    its share, resumable, labels travelling with their images."""
    source = folder_source(splits, loader)
    subset = knn_subset(13, 10, seed=5)
    steps = train_steps(source, 4, max_images=10)  # 10 // 8: one step per epoch
    expected = local_batch_indices(10, 8, seed=5)
    for x, y in steps:
        assert x.shape == (2, 4, S, S, 3) and x.dtype == np.uint8 and y.shape == (2, 4) and y.dtype == np.int32
        ids = subset[next(expected)]  # position i is the i-th file of the subset
        np.testing.assert_array_equal(ids_of(x.reshape(8, S, S, 3), n=N_IDS, gray=()), ids)
        np.testing.assert_array_equal(y.reshape(8), [CLASS[i] for i in ids])
    for a, b in zip(steps[2:], train_steps(source, 2, start_step=2, max_images=10)):  # resumed
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    shares = [train_steps(source, 2, processes=2, process_index=p, devices=1, max_images=10) for p in range(2)]
    for s in range(2):  # the two shares, side by side, are the global batch (crops included with grain)
        ids = np.concatenate([ids_of(shares[p][s][0].reshape(4, S, S, 3), n=N_IDS, gray=()) for p in range(2)])
        np.testing.assert_array_equal(ids, ids_of(steps[s][0].reshape(8, S, S, 3), n=N_IDS, gray=()))
        if loader == "grain":
            np.testing.assert_array_equal(np.concatenate([shares[p][s][0] for p in range(2)], 1),
                                          steps[s][0].reshape(1, 8, S, S, 3))
    with pytest.raises(ValueError, match="not divisible"):
        source.labelled_train_batches(global_batch=6, seed=0, crop_size=S, num_local_devices=4)  # eagerly
    with pytest.raises(ValueError, match="not divisible"):
        source.eval_batches(split="val", size=S, crop_fraction=1.0, global_batch=6, num_local_devices=4)


def test_grain_labelled_crop_is_one_random_resized_crop_of_the_whole_image(splits):
    """grain: exactly the crop of `stream_uniforms(seed, position, 1)` boxes
    of the decoded image, its global stream position being the seed."""
    source = folder_source(splits)
    files = source._labelled("train")
    step = 1
    (x, _), = train_steps(source, 1, processes=2, process_index=1, devices=1, start_step=step,
                          crop_scale=(0.1, 0.5))
    positions = step * 8 + 4 + np.arange(4)
    u = pillow_ops.stream_uniforms(5, positions, num_boxes=1)
    for j, index in enumerate(next(local_batch_indices(13, 8, 5, step, 1, 2))):
        with open(files.path(index), "rb") as f:
            image = pillow_ops.open_image(f.read())
        box = crop_rule.crop_boxes(u[j], image.size[1], image.size[0], (0.1, 0.5))
        want = np.empty((1, S, S, 3), np.uint8)
        pillow_ops.crops_into(want, image, box)
        np.testing.assert_array_equal(x[0, j], want[0])


@pytest.mark.slow
def test_grain_worker_processes_give_the_same_streams(splits):
    """Through grain worker processes (the default where there are cores to
    spare), the very same evaluation and training steps."""
    here, workers = folder_source(splits), folder_source(splits, input_workers=2)
    for a, b in zip(eval_rows(here, split="val", global_batch=4), eval_rows(workers, split="val", global_batch=4)):
        np.testing.assert_array_equal(a, b)
    for (x, y), (u, v) in zip(train_steps(here, 3), train_steps(workers, 3)):
        np.testing.assert_array_equal(x, u)
        np.testing.assert_array_equal(y, v)


def test_num_eval_steps():
    assert [num_eval_steps(m, 4) for m in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="positive"):
        num_eval_steps(3, 0)


def test_folder_eval_split_classes_must_exist_in_train(splits, tmp_path):
    shutil.copytree(splits / "train", tmp_path / "train")
    shutil.copytree(splits / "val", tmp_path / "val")
    (tmp_path / "val" / "fox").mkdir()
    _save(tmp_path / "val" / "fox" / "a.png", 1, fmt="PNG")
    source = folder_source(tmp_path)
    with pytest.raises(ValueError, match="eval classes missing from train: \\['fox'\\]"):
        source.eval_batches(split="val", size=S, crop_fraction=1.0, global_batch=4)


@pytest.mark.parametrize("loader", LOADERS)
def test_folder_undecodable_images(corrupt_splits, loader, caplog):
    source = folder_source(corrupt_splits, loader)
    with pytest.raises(UndecodableImageError, match=r"08\.jpg.*skip_corrupt_images"):
        eval_rows(source, split="val", global_batch=4)
    skipping = folder_source(corrupt_splits, loader, skip_corrupt_images=True)
    with caplog.at_level(logging.WARNING):
        steps = list(skipping.eval_batches(split="val", size=S, crop_fraction=1.0, global_batch=4))
    assert len(steps) == 3
    valid = np.concatenate([v.reshape(-1) for _, _, v in steps])
    np.testing.assert_array_equal(valid, [True] * 8 + [False] * 4)  # 08, 09 undecodable, 2 padding
    images = np.concatenate([x.reshape(-1, S, S, 3) for x, _, _ in steps])
    np.testing.assert_array_equal(ids_of(images[:8, None], n=10, gray=())[:, 0], np.arange(8))
    skips = [r.getMessage() for r in caplog.records if "skipping undecodable" in r.getMessage()]
    assert len(skips) == 2 and "08.jpg" in skips[0] and "09.png" in skips[1]
    # Training: the slot and its label are another example's of the step.
    for x, y in train_steps(skipping, 3, global_batch=5, devices=1):
        ids = ids_of(x.reshape(5, S, S, 3), n=10, gray=())
        assert not set(ids) & {8, 9}
        np.testing.assert_array_equal(y.reshape(5), ids // 5)


# --------------------------------------------------------------------------- in-memory arrays
def id_arrays():
    """Images whose every pixel is their index: train 0..22, test 100..109."""
    train = np.broadcast_to(np.arange(23, dtype=np.uint8)[:, None, None, None], (23, 4, 4, 3))
    test = np.broadcast_to(np.arange(100, 110, dtype=np.uint8)[:, None, None, None], (10, 4, 4, 3))
    return ArrayDataset(np.ascontiguousarray(train), np.arange(23, dtype=np.int32) % 4,
                        np.ascontiguousarray(test), np.arange(10, dtype=np.int32) % 4, num_classes=4, name="ids")


def test_array_source_streams():
    source = ArraySource(id_arrays()).with_train_subset(12, seed=1)  # pretraining subset: not the labelled one
    assert source.num_classes() == 4 and source.num_labelled() == 23 and source.num_labelled("test") == 10
    assert source.num_labelled("train", 16, 2) == 16
    subset = knn_subset(23, 16, seed=2)
    expected = local_batch_indices(16, 8, seed=2, process_index=1, process_count=2, num_local_devices=2)
    steps = train_steps(source, 3, processes=2, process_index=1, seed=2, max_images=16)
    for x, y in steps:
        ids = subset[next(expected)]
        assert x.shape == (2, 2, 4, 4, 3) and y.shape == (2, 2)  # whole images: the device crops
        np.testing.assert_array_equal(x.reshape(4, -1)[:, 0], ids)
        np.testing.assert_array_equal(y.reshape(4), ids % 4)
    resumed = train_steps(source, 1, processes=2, process_index=1, seed=2, max_images=16, start_step=2)
    np.testing.assert_array_equal(resumed[0][0], steps[2][0])
    arrays = source.labelled_arrays(size=0, max_train_images=16, seed=2)
    for split, want_x, want_y in (("test", arrays.test_images, arrays.test_labels),
                                  ("train", arrays.train_images, arrays.train_labels)):
        images, labels, counts = eval_rows(source, split=split, global_batch=4, max_images=16, seed=2)
        assert counts == [num_eval_steps(len(want_y), 4)] * 2
        np.testing.assert_array_equal(images, want_x)
        np.testing.assert_array_equal(labels, want_y)


# --------------------------------------------------------------------------- tensorflow-datasets
@pytest.fixture(scope="module")
def tfds_prepared(tmp_path_factory):
    """The tiny dataset (20 train, 6 test records) as ArrayRecord and TFRecord files."""
    pytest.importorskip("tensorflow_datasets")
    from tfds_tiny import prepare

    root = tmp_path_factory.mktemp("tfds")
    return {fmt: prepare(root / fmt, fmt).parent.parent for fmt in ("array_record", "tfrecord")}


def tfds_source(data_dir):
    from tfds_tiny import NAME

    config = default.get_config()
    config.update(dict(dataset=f"tfds:{NAME}", data_dir=str(data_dir), crop_size=S, input_workers=0,
                       input_threads=2))
    return data.open_source(config)


def record_ids(data_dir, split):
    import tensorflow_datasets as tfds
    from tfds_tiny import NAME

    source = tfds.data_source(NAME, split=split, data_dir=str(data_dir))
    return np.asarray([source[i]["id"] for i in range(len(source))])


@pytest.mark.parametrize("fmt", ["array_record", pytest.param("tfrecord", marks=needs_tf)])
def test_tfds_streams(tfds_prepared, fmt):
    source = tfds_source(tfds_prepared[fmt])
    assert source.loader == ("grain" if fmt == "array_record" else "tf")
    assert source.num_classes() == 3 and source.num_labelled("test") == 6 and source.num_labelled("", 12, 5) == 12
    arrays = source.labelled_arrays(size=S, crop_fraction=FRACTION, max_train_images=12, seed=5)
    for split, want_x, want_y in (("test", arrays.test_images, arrays.test_labels),
                                  ("train", arrays.train_images, arrays.train_labels)):
        images, labels, counts = eval_rows(source, split=split, global_batch=4, max_images=12, seed=5)
        assert counts == [num_eval_steps(len(want_y), 4)] * 2
        np.testing.assert_array_equal(images, want_x)
        np.testing.assert_array_equal(labels, want_y)
    steps = train_steps(source, 3, max_images=12)
    for x, y in steps:
        ids = ids_of(x.reshape(8, S, S, 3), n=26, gray=())
        assert x.shape == (2, 4, S, S, 3) and y.dtype == np.int32
        np.testing.assert_array_equal(y.reshape(8), ids % 3)
    resumed = train_steps(source, 1, max_images=12, start_step=2)
    np.testing.assert_array_equal(resumed[0][0], steps[2][0])
    if fmt == "array_record":  # grain: local_batch_indices over the random subset
        ids, subset = record_ids(tfds_prepared[fmt], "train"), knn_subset(20, 12, seed=5)
        for (x, _), order in zip(steps, local_batch_indices(12, 8, seed=5)):
            np.testing.assert_array_equal(ids_of(x.reshape(8, S, S, 3), n=26, gray=()), ids[subset[order]])
    else:  # tf.data: the first 12 records, in its pretraining order
        first = set(record_ids(tfds_prepared["array_record"], "train")[:12])
        assert set(ids_of(np.concatenate([x for x, _ in steps]).reshape(-1, S, S, 3), n=26, gray=())) <= first
