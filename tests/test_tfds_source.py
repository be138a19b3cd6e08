"""Tests for the tensorflow-datasets source through tf.data, offline
(`tfds.testing.mock_data` serves TFRecord datasets, which only tf.data reads;
tests/test_tfds_grain.py covers ArrayRecord datasets through grain)."""
import itertools

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="these tests exercise the optional tf.data pipeline "
                    "(pip install -r requirements-tf.txt)")
tfds = pytest.importorskip("tensorflow_datasets")

from configs import default  # noqa: E402
from moco_jax.data.sources import tfds as tfds_source  # noqa: E402
from tiny import knn_arrays, pretrain_source  # noqa: E402

S = 8


def tfds_config(**overrides):
    config = default.get_config()
    config.update(dict(dataset="cifar10", crop_size=S, crop_scale=(0.2, 1.0), batch_size=8,
                       input_threads=2, shuffle_buffer=16, knn_max_train_images=12))
    config.update(overrides)
    return config


def take(config, n, start_step=0, process_index=0, process_count=1, num_local_devices=2):
    """(source, steps per epoch), and the first n batches of the stream."""
    source, batches, steps_per_epoch = pretrain_source(config, start_step, process_index, process_count,
                                                       num_local_devices)
    return (source, steps_per_epoch), list(itertools.islice(batches, n))


@pytest.fixture(scope="class")
def mocked():
    with tfds.testing.mock_data(num_examples=20):
        yield


@pytest.fixture(scope="class")
def run(mocked):
    """7 steps: 2 steps/epoch (20 examples, batch 8), so 3+ epochs."""
    return take(tfds_config(), 7)


class TestMocked:
    """Under `tfds.testing.mock_data` (20 random examples, any split); the
    mock is active for this class only."""

    def test_pretrain_input_by_name(self, run):
        (source, steps_per_epoch), batches = run
        assert source.host_cropped and source.num_train_examples == 20 and steps_per_epoch == 2
        assert batches[0].shape == (2, 4, 2, S, S, 3) and batches[0].dtype == np.uint8
        # The mock's images are random noise: all crops distinct, both views differ.
        flat = np.concatenate(batches).reshape(-1, 2, S * S * 3)
        assert not np.array_equal(flat[:, 0], flat[:, 1])
        assert flat.std() > 5  # bilinear upsampling smooths the noise


    def test_epochs_are_reshuffled_permutations(self):
        # With crop scale 1 every "random" crop of a square image is the whole
        # image, resized: the kNN view of the same example, which names it.
        config = tfds_config(crop_scale=(1.0, 1.0))
        whole = knn_arrays(config).test_images.reshape(20, -1).astype(int)
        _, batches = take(config, 6)
        ids = []
        for b in batches:
            views = b.reshape(8, 2, -1).astype(int)
            dist = np.abs(views[:, :, None] - whole[None, None]).max(-1)  # (8, 2, 20)
            assert np.all(dist.min(-1) <= 1)  # both views are the whole example
            ids.append(dist.argmin(-1)[:, 0])
        epochs = [np.concatenate(ids[i:i + 2]) for i in (0, 2, 4)]
        for e in epochs:
            assert len(set(e.tolist())) == 16  # no example twice in an epoch
        assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])

    def test_deterministic_and_resumable(self, run, mocked):
        _, batches = run
        _, resumed = take(tfds_config(), 4, start_step=3)  # mid-epoch 1
        for a, b in zip(batches[3:], resumed):
            np.testing.assert_array_equal(a, b)
        _, other = take(tfds_config(seed=1), 1)
        assert not np.array_equal(other[0], batches[0])


    def test_knn_arrays(self, mocked):
        ds = knn_arrays(tfds_config())
        assert ds.train_images.shape == (12, S, S, 3) and ds.test_images.shape == (20, S, S, 3)
        assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32
        assert ds.num_classes == 10 and 0 <= ds.test_labels.min() and ds.test_labels.max() < 10


    def test_tfds_prefix_and_process_split(self, mocked):
        assert tfds_source.dataset_name("tfds:cifar10") == "cifar10"
        pi, b = take(tfds_config(dataset="tfds:cifar10"), 1, process_index=1, process_count=2)
        assert b[0].shape == (2, 2, 2, S, S, 3)
        with pytest.raises(ValueError, match="process_count=3"):
            take(tfds_config(), 1, process_count=3)




def test_not_prepared_is_one_clear_error(tmp_path):
    config = tfds_config(data_dir=str(tmp_path))
    with pytest.raises(tfds_source.DatasetNotPreparedError) as err:
        pretrain_source(config)
    msg = str(err.value)
    assert "'cifar10'" in msg and str(tmp_path) in msg and "tfds.builder('cifar10'" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback
    with pytest.raises(tfds_source.DatasetNotPreparedError, match="manual"):
        knn_arrays(tfds_config(dataset="imagenet2012", data_dir=str(tmp_path)))


def test_unknown_name():
    with pytest.raises(ValueError, match="not a tensorflow-datasets name"):
        tfds_source.prepared_builder("no_such_dataset_xyz")
