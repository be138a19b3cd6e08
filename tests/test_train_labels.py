"""`Source.train_batches(labels=True)`: the pretraining batches with each
example's label (an online linear probe). The batches are those of
labels=False, bit for bit (crops included), and each label is its example's,
found through `local_batch_indices` and the listing; resumed and split over
processes as the batches are; an undecodable image's slot carries the label
of the image that fills it.

In-memory digits (with and without a pretraining subset), an image folder
through grain and tf.data (tests/image_files.py: solid colours, one per file,
so each crop tells its file), the tiny tensorflow-datasets dataset through
grain (ArrayRecord) and tf.data (TFRecord).
"""
import dataclasses
import itertools
import shutil

import numpy as np
import pytest

from configs import default
from moco_jax import data
from moco_jax.core.errors import ConfigError
from moco_jax.data.pipelines import grain
from moco_jax.data.source import has_module, knn_subset, local_batch_indices
from moco_jax.data.sources.arrays import ArraySource, load_digits
from moco_jax.data.sources.image_folder import FileImages
from image_files import ids_of

S = 8  # crop size
needs_tf = pytest.mark.skipif(not has_module("tensorflow"), reason="the tf.data pipeline is optional and "
                              "TensorFlow is not installed (pip install -r requirements-tf.txt)")
LOADERS = [pytest.param("grain"), pytest.param("tf", marks=needs_tf)]


def steps(source, n, labels, processes=1, process_index=0, devices=2, **kw):
    """The first n items of `source.train_batches`."""
    args = dict(global_batch=8, seed=5, crop_size=S, crop_scale=(0.2, 1.0))
    args.update(kw)
    return list(itertools.islice(source.train_batches(process_index=process_index, process_count=processes,
                                                      num_local_devices=devices, labels=labels, **args), n))


def check_same_batches(plain, labelled, devices=2):
    """labels=True yields (the labels=False batch, int32 (devices, per_device))."""
    for x, (u, y) in zip(plain, labelled, strict=True):
        assert isinstance(x, np.ndarray) and x.dtype == u.dtype
        np.testing.assert_array_equal(x, u)
        assert y.dtype == np.int32 and y.shape == x.shape[:2] and x.shape[0] == devices


# --------------------------------------------------------------------------- in-memory arrays
@pytest.mark.parametrize("subset", [0, 300])
def test_array_source(subset):
    ds = load_digits()
    source = ArraySource(ds).with_train_subset(subset, seed=1)
    index = knn_subset(len(ds.train_labels), subset, seed=1)  # all, or the pretraining subset
    n = len(index)
    plain, labelled = steps(source, 4, False, global_batch=64), steps(source, 4, True, global_batch=64)
    check_same_batches(plain, labelled)
    for (x, y), idx in zip(labelled, local_batch_indices(n, 64, seed=5)):
        np.testing.assert_array_equal(y.reshape(-1), ds.train_labels[index[idx]])
        np.testing.assert_array_equal(x.reshape(64, -1), ds.train_images[index[idx]].reshape(64, -1))
    resumed = steps(source, 2, True, global_batch=64, start_step=2)
    for (x, y), (u, v) in zip(labelled[2:], resumed):
        np.testing.assert_array_equal(x, u)
        np.testing.assert_array_equal(y, v)
    shares = [steps(source, 3, True, global_batch=64, processes=2, process_index=p) for p in range(2)]
    for s in range(3):
        for k in range(2):  # images and labels: the two shares side by side are the global batch
            whole = np.concatenate([shares[p][s][k].reshape(32, -1) for p in range(2)])
            np.testing.assert_array_equal(whole, labelled[s][k].reshape(64, -1))


# --------------------------------------------------------------------------- image folders
def folder_source(root, loader, **overrides):
    config = default.get_config()
    config.update(dict(dataset="image_folder", data_dir=str(root), train_split="", crop_size=S, input_threads=2,
                       input_workers=0, data_loader=loader, resize_on_device=False))  # host crops: ids_of reads them
    config.update(overrides)
    return data.open_source(config)


@pytest.mark.parametrize("loader", LOADERS)
def test_image_folder(folder, loader):
    """root/cat/00..09, root/dog/10..19: file i is the i-th of the listing, label i // 10."""
    source = folder_source(folder, loader)
    assert source.loader == loader and source.num_classes() == 2
    listing = source.files
    plain, labelled = steps(source, 5, False), steps(source, 5, True)  # 2 steps per epoch: 3 epochs
    check_same_batches(plain, labelled)
    for (x, y), idx in zip(labelled, local_batch_indices(20, 8, seed=5)):
        assert x.shape == (2, 4, 2, S, S, 3)
        np.testing.assert_array_equal(ids_of(x).reshape(8, 2), np.stack([idx, idx], 1))  # both views
        np.testing.assert_array_equal(y.reshape(8), listing.labels[idx])
        np.testing.assert_array_equal(y.reshape(8), idx // 10)
    for (x, y), (u, v) in zip(labelled[3:], steps(source, 2, True, start_step=3)):  # resumed
        np.testing.assert_array_equal(x, u)
        np.testing.assert_array_equal(y, v)
    shares = [steps(source, 3, True, processes=2, process_index=p, devices=1) for p in range(2)]
    for s in range(3):
        np.testing.assert_array_equal(np.concatenate([shares[p][s][1] for p in range(2)], 1),
                                      labelled[s][1].reshape(1, 8))
        ids = np.concatenate([ids_of(shares[p][s][0]).reshape(4, 2) for p in range(2)])
        np.testing.assert_array_equal(ids, ids_of(labelled[s][0]).reshape(8, 2))
        if loader == "grain":  # crops seeded by the global position: the same crops
            np.testing.assert_array_equal(np.concatenate([shares[p][s][0] for p in range(2)], 1),
                                          labelled[s][0].reshape(1, 8, 2, S, S, 3))
    with pytest.raises(ValueError, match="not divisible"):  # eagerly, as without labels
        source.train_batches(global_batch=6, seed=0, crop_size=S, num_local_devices=4, labels=True)


@pytest.fixture(scope="module")
def corrupt_classes(corrupt_folder, tmp_path_factory):
    """The corrupt folder's files as a/ (00..04) and b/ (05..09: the truncated
    08.jpg and the garbage 09.png)."""
    root = tmp_path_factory.mktemp("corrupt_classes")
    for name, ids in (("a", range(5)), ("b", range(5, 10))):
        (root / name).mkdir()
        for f in sorted(corrupt_folder.iterdir()):
            if int(f.stem) in ids:
                shutil.copy(f, root / name / f.name)
    return root


@pytest.mark.parametrize("loader", LOADERS)
def test_skipped_image_slot_has_the_label_of_its_filler(corrupt_classes, loader):
    source = folder_source(corrupt_classes, loader, skip_corrupt_images=True)
    plain, labelled = (steps(source, 4, labels, global_batch=5, devices=1) for labels in (False, True))
    check_same_batches(plain, labelled, devices=1)
    filled = 0
    for (x, y), idx in zip(labelled, local_batch_indices(10, 5, seed=5)):
        ids = ids_of(x, n=10, gray=()).reshape(5, 2)
        np.testing.assert_array_equal(ids[:, 0], ids[:, 1])
        assert not set(ids[:, 0]) & {8, 9}
        np.testing.assert_array_equal(y.reshape(5), ids[:, 0] // 5)  # the filler's label
        filled += int((ids[:, 0] != idx).sum())
    assert filled >= 2  # 08 and 09 were met (2 epochs of all 10 files) and filled


@pytest.mark.parametrize("loader", LOADERS)
def test_no_class_folders(corrupt_folder, loader):
    """Files directly in the folder have no label: a one-line error at call time."""
    source = folder_source(corrupt_folder, loader)
    with pytest.raises(ConfigError, match=f"the online probe needs class folders in {corrupt_folder}: 10 of "):
        source.train_batches(global_batch=4, seed=0, crop_size=S, labels=True)


@dataclasses.dataclass(frozen=True)
class LabelledOnly:
    """Image files that fail the test if an image is read without its label."""

    files: FileImages

    def __len__(self):
        return len(self.files)

    def read(self, index):
        raise AssertionError("a labelled stream read an image without its label")

    def read_labelled(self, index):
        return self.files.read_labelled(index)

    def describe(self, index):
        return self.files.describe(index)


def test_grain_reads_each_label_with_its_image(folder):
    source = folder_source(folder, "grain")
    files = LabelledOnly(FileImages(source.files, labelled=True))
    args = dict(global_batch=8, seed=5, crop_size=S, crop_scale=(0.2, 1.0), num_local_devices=2)
    got = list(itertools.islice(grain.two_crop_batches(files, labels=True, **args), 2))
    check_same_batches(steps(source, 2, False), got)


# --------------------------------------------------------------------------- tensorflow-datasets
@pytest.fixture(scope="module")
def tfds_prepared(tmp_path_factory):
    """The tiny dataset (20 train records, labels id % 3) as ArrayRecord and TFRecord files."""
    pytest.importorskip("tensorflow_datasets")
    from tfds_tiny import prepare

    root = tmp_path_factory.mktemp("tfds")
    return {fmt: prepare(root / fmt, fmt).parent.parent for fmt in ("array_record", "tfrecord")}


@pytest.mark.parametrize("fmt", ["array_record", pytest.param("tfrecord", marks=needs_tf)])
def test_tfds(tfds_prepared, fmt):
    """grain (ArrayRecord): the labels of local_batch_indices' records; tf.data
    (TFRecord): its own order, each label its crop's record's."""
    import tensorflow_datasets as tfds
    from tfds_tiny import NAME

    config = default.get_config()
    config.update(dict(dataset=f"tfds:{NAME}", data_dir=str(tfds_prepared[fmt]), crop_size=S, input_workers=0,
                       input_threads=2, resize_on_device=False))  # host crops: ids_of reads them
    source = data.open_source(config)
    assert source.loader == ("grain" if fmt == "array_record" else "tf")
    plain, labelled = steps(source, 3, False), steps(source, 3, True)
    check_same_batches(plain, labelled)
    for x, y in labelled:
        np.testing.assert_array_equal(y.reshape(-1), ids_of(x, n=26, gray=()).reshape(8, 2)[:, 0] % 3)
    for (x, y), (u, v) in zip(labelled[2:], steps(source, 1, True, start_step=2)):
        np.testing.assert_array_equal(x, u)
        np.testing.assert_array_equal(y, v)
    if fmt == "array_record":
        records = tfds.data_source(NAME, split="train", data_dir=str(tfds_prepared[fmt]))
        labels = np.asarray([records[i]["label"] for i in range(len(records))])
        for (_, y), idx in zip(labelled, local_batch_indices(20, 8, seed=5)):
            np.testing.assert_array_equal(y.reshape(-1), labels[idx])
    config.label_key = "no_such_key"
    with pytest.raises(ConfigError, match="label_key='no_such_key'"):  # at call time
        data.open_source(config).train_batches(global_batch=8, seed=0, crop_size=S, labels=True)
