"""tensorflow-datasets datasets in the ArrayRecord format through grain
(`tfds.data_source`, no TensorFlow at read time), the TFRecord -> ArrayRecord
converter, and the choice between grain and tf.data."""
import itertools

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from configs import default  # noqa: E402
from moco_jax import data  # noqa: E402
from moco_jax.core.errors import ConfigError  # noqa: E402
from moco_jax.data import convert_tfds  # noqa: E402
from moco_jax.data.sources import tfds as tfds_source  # noqa: E402
from moco_jax.data.source import local_batch_indices  # noqa: E402
from image_files import ids_of  # noqa: E402
from tfds_tiny import NAME, NUM_TEST, NUM_TRAIN, prepare  # noqa: E402
from tiny import knn_arrays, pretrain_source  # noqa: E402

S = 8
N_IDS = NUM_TRAIN + NUM_TEST


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The dataset prepared twice: as ArrayRecord and as TFRecord files."""
    root = tmp_path_factory.mktemp("tfds")
    return {fmt: prepare(root / fmt, fmt) for fmt in ("array_record", "tfrecord")}


def tfds_config(data_dir, **overrides):
    config = default.get_config()
    config.update(dict(dataset=f"tfds:{NAME}", data_dir=str(data_dir), crop_size=S, crop_scale=(0.2, 1.0),
                       batch_size=8, input_workers=0, input_threads=2, knn_max_train_images=12, seed=5,
                       resize_on_device=False))  # host crops: ids_of reads them (tests/test_device_resize.py)
    config.update(overrides)
    return config


def example_ids(data_dir, split="train"):
    """The `id` feature of each record index, in file order."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(NAME, split=split, data_dir=str(data_dir))
    return np.asarray([source[i]["id"] for i in range(len(source))])


def test_array_record_datasets_go_through_grain(prepared):
    data_dir = prepared["array_record"].parent.parent
    source, batches, steps_per_epoch = pretrain_source(tfds_config(data_dir), num_local_devices=2)
    assert source.loader == "grain" and source.num_train_examples == NUM_TRAIN and steps_per_epoch == 2
    steps = list(itertools.islice(batches, 6))
    assert steps[0].shape == (2, 4, 2, S, S, 3) and steps[0].dtype == np.uint8
    # Every source's order: record index local_batch_indices(...) at each step.
    ids, expected = example_ids(data_dir), local_batch_indices(NUM_TRAIN, 8, seed=5)
    for step in steps:
        views = ids_of(step, n=N_IDS, gray=()).reshape(8, 2)
        np.testing.assert_array_equal(views[:, 0], views[:, 1])
        np.testing.assert_array_equal(views[:, 0], ids[next(expected)])
    # Resumed at step 3: the same batches, crops included.
    _, resumed, _ = pretrain_source(tfds_config(data_dir), start_step=3, num_local_devices=2)
    for a, b in zip(steps[3:], itertools.islice(resumed, 3)):
        np.testing.assert_array_equal(a, b)
    # Process 1 of 2 reads the second half of each global batch.
    _, second, _ = pretrain_source(tfds_config(data_dir), process_index=1, process_count=2)
    np.testing.assert_array_equal(next(second)[0], steps[0].reshape(8, 2, S, S, 3)[4:])


def test_labelled_arrays_through_grain(prepared):
    data_dir = prepared["array_record"].parent.parent
    ds = knn_arrays(tfds_config(data_dir))
    assert ds.train_images.shape == (12, S, S, 3) and ds.test_images.shape == (NUM_TEST, S, S, 3)
    assert ds.num_classes == 3
    train_ids = ids_of(ds.train_images[:, None], n=N_IDS, gray=())[:, 0]
    test_ids = ids_of(ds.test_images[:, None], n=N_IDS, gray=())[:, 0]
    np.testing.assert_array_equal(ds.train_labels, train_ids % 3)  # labels travel with their images
    np.testing.assert_array_equal(ds.test_labels, test_ids % 3)
    assert len(set(train_ids)) == 12 and set(test_ids) == set(range(NUM_TRAIN, N_IDS))


def test_tfrecord_datasets_need_tf_data_or_a_conversion(prepared, tmp_path):
    tfrecord_dir = prepared["tfrecord"].parent.parent
    assert data.open_source(tfds_config(tfrecord_dir)).loader == "tf"  # auto: the reader that can
    with pytest.raises(ConfigError, match="prepared as tfrecord files.*moco_jax.convert_tfds"):
        data.open_source(tfds_config(tfrecord_dir, data_loader="grain"))
    # Converted, it reads like the dataset prepared as ArrayRecord: same records, same order.
    out = convert_tfds.convert(prepared["tfrecord"], tmp_path / "converted")
    assert out == tmp_path / "converted" / NAME / "1.0.0"
    source = data.open_source(tfds_config(tmp_path / "converted"))
    assert source.loader == "grain" and source.num_train_examples == NUM_TRAIN
    for split in ("train", "test"):
        np.testing.assert_array_equal(example_ids(tmp_path / "converted", split),
                                      example_ids(prepared["array_record"].parent.parent, split))
    a = next(pretrain_source(tfds_config(tmp_path / "converted"))[1])
    b = next(pretrain_source(tfds_config(prepared["array_record"].parent.parent))[1])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="prepared as array_record"):
        convert_tfds.convert(out, tmp_path / "again")


def test_tf_data_cannot_read_array_record_files(prepared):
    data_dir = prepared["array_record"].parent.parent
    with pytest.raises(ConfigError, match="data_loader='tf' cannot read.*array_record files"):
        data.open_source(tfds_config(data_dir, data_loader="tf"))


def test_not_prepared_says_how_to_prepare_as_array_record(tmp_path):
    with pytest.raises(tfds_source.DatasetNotPreparedError, match="file_format='array_record'"):
        data.open_source(tfds_config(tmp_path, dataset="mnist"))
