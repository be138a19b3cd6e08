"""Tests for moco_jax.data: datasets, resumable batching, sources, device feed."""
import itertools
from pathlib import Path

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_load_digits

from moco_jax import data
from moco_jax.core import sharding
from moco_jax.data.sources import arrays
from moco_jax.data.feed import prefetch_to_device
from moco_jax.data.source import array_batches, epoch_permutation, knn_subset, local_batch_indices, steps_per_epoch
from tiny import knn_arrays, pretrain_source

CIFAR10_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


# ----------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def raw_digits():
    raw = sk_load_digits()
    return raw.images, raw.target


@pytest.fixture(scope="module")
def digits8():
    return arrays.load_digits(image_size=8)


def _match_raw_indices(images_uint8, raw_images):
    """Map each 8x8 loaded image back to its raw index (all raw images unique)."""
    raw_u8 = np.round(raw_images * 255 / 16).astype(np.uint8).reshape(len(raw_images), -1)
    lookup = {row.tobytes(): i for i, row in enumerate(raw_u8)}
    gray = images_uint8[..., 0].reshape(len(images_uint8), -1)
    return np.array([lookup[row.tobytes()] for row in gray])


def test_digits_shapes_dtype_range():
    ds = arrays.load_digits(image_size=16)
    assert ds.train_images.shape[1:] == (16, 16, 3)
    assert ds.test_images.shape[1:] == (16, 16, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert len(ds.train_images) + len(ds.test_images) == 1797
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    # Grey replicated to 3 identical channels.
    np.testing.assert_array_equal(ds.train_images[..., 0], ds.train_images[..., 2])
    assert ds.num_classes == 10 and ds.name == "digits"


def test_digits_split_is_stratified_and_disjoint(raw_digits, digits8):
    raw_images, raw_labels = raw_digits
    train_idx = _match_raw_indices(digits8.train_images, raw_images)
    test_idx = _match_raw_indices(digits8.test_images, raw_images)
    assert not set(train_idx) & set(test_idx)
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(1797))
    # Labels travel with their images.
    np.testing.assert_array_equal(digits8.train_labels, raw_labels[train_idx])
    np.testing.assert_array_equal(digits8.test_labels, raw_labels[test_idx])
    per_class = np.bincount(raw_labels)
    test_counts = np.bincount(digits8.test_labels, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1)


def test_digits_deterministic_and_seeded(digits8):
    again = arrays.load_digits(image_size=8)
    np.testing.assert_array_equal(digits8.test_images, again.test_images)
    other = arrays.load_digits(image_size=8, seed=1)
    assert not np.array_equal(digits8.test_labels, other.test_labels)


def test_digits_upsampling_preserves_content(digits8):
    big = arrays.load_digits(image_size=16)
    # Same split regardless of size; 2x2 average-pooling the bilinear upsample
    # must look like the 8x8 original.
    pooled = big.train_images[..., 0].astype(np.float32).reshape(-1, 8, 2, 8, 2).mean((2, 4))
    small = digits8.train_images[..., 0].astype(np.float32)
    np.testing.assert_array_equal(big.train_labels, digits8.train_labels)
    corr = np.corrcoef(pooled.ravel(), small.ravel())[0, 1]
    assert corr > 0.95
    assert abs(pooled.mean() - small.mean()) < 3.0


def test_load_array_dataset_dispatch_and_unknown():
    ds = arrays.load_array_dataset("digits", image_size=12)
    assert ds.train_images.shape[1:] == (12, 12, 3)
    with pytest.raises(ValueError, match="cifar10_arrays"):
        arrays.load_array_dataset("mnist")


# ----------------------------------------------------------------- cifar10
def test_cifar10_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10_train_q95.jpg"):
        arrays.load_cifar10_arrays(tmp_path)


def test_cifar10_real_files():
    if not CIFAR10_DIR.is_dir():
        pytest.skip(f"CIFAR-10 mosaics not found: {CIFAR10_DIR} does not exist")
    ds = arrays.load_array_dataset("cifar10_arrays", data_dir=CIFAR10_DIR)
    assert ds.train_images.shape == (50000, 32, 32, 3)
    assert ds.test_images.shape == (10000, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
    assert not np.array_equal(ds.test_images[0], ds.test_images[1])
    # Mosaic order is row-major: image 1 is tile (row 0, col 1), image 100 is
    # tile (row 1, col 0) of the 100x100-tile lossless test mosaic.
    from PIL import Image
    with Image.open(CIFAR10_DIR / "cifar10_test_lossless.webp") as im:
        mosaic = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(ds.test_images[1], mosaic[0:32, 32:64])
    np.testing.assert_array_equal(ds.test_images[100], mosaic[32:64, 0:32])
    assert ds.train_images.std() > 30  # real photos, not a blank decode


# ----------------------------------------------------------------- batching
N, GB, SEED = 50, 8, 3  # 6 full steps per epoch, 2 examples dropped


@pytest.fixture(scope="module")
def id_images():
    """(N, 2, 2, 3) uint8 images whose every pixel equals the example id."""
    return np.broadcast_to(np.arange(N, dtype=np.uint8)[:, None, None, None],
                           (N, 2, 2, 3)).copy()


def _ids(batch):
    return batch[..., 0, 0, 0].reshape(-1)


def test_epoch_permutation_and_steps():
    p = epoch_permutation(10, seed=0, epoch=0)
    assert sorted(p.tolist()) == list(range(10))
    np.testing.assert_array_equal(p, epoch_permutation(10, seed=0, epoch=0))
    assert not np.array_equal(p, epoch_permutation(10, seed=0, epoch=1))
    assert not np.array_equal(p, epoch_permutation(10, seed=1, epoch=0))
    assert steps_per_epoch(10, 3) == 3
    with pytest.raises(ValueError):
        steps_per_epoch(5, 8)


def test_array_batches_epochs(id_images):
    spe = steps_per_epoch(N, GB)
    stream = array_batches(id_images, GB, SEED)
    epochs = [np.concatenate([_ids(next(stream)) for _ in range(spe)]) for _ in range(2)]
    for e, ids in enumerate(epochs):
        assert len(set(ids.tolist())) == spe * GB  # each example at most once
        np.testing.assert_array_equal(ids, epoch_permutation(N, SEED, e)[:spe * GB])
    assert not np.array_equal(epochs[0], epochs[1])


def test_array_batches_shape_dtype(id_images):
    batch = next(array_batches(id_images, GB, SEED, num_local_devices=4))
    assert batch.shape == (4, 2, 2, 2, 3) and batch.dtype == np.uint8


def test_array_batches_resume(id_images):
    full = list(itertools.islice(array_batches(id_images, GB, SEED), 20))
    resumed = list(itertools.islice(array_batches(id_images, GB, SEED, start_step=7), 13))
    for a, b in zip(full[7:], resumed):
        np.testing.assert_array_equal(a, b)


def test_array_batches_processes_form_global_batch(id_images):
    single = array_batches(id_images, GB, SEED)
    procs = [array_batches(id_images, GB, SEED, start_step=4, process_index=p,
                                process_count=2, num_local_devices=2) for p in range(2)]
    for _ in range(4):
        next(single)
    for _ in range(5):  # crosses the epoch boundary at step 6
        parts = [next(it) for it in procs]
        assert parts[0].shape == (2, 2, 2, 2, 3)
        np.testing.assert_array_equal(
            np.concatenate([_ids(p) for p in parts]), _ids(next(single)))
        assert not set(_ids(parts[0]).tolist()) & set(_ids(parts[1]).tolist())


def test_array_batches_divisibility_errors(id_images):
    with pytest.raises(ValueError, match="process_count=3"):
        array_batches(id_images, 8, SEED, process_count=3)
    with pytest.raises(ValueError, match="num_local_devices=3"):
        array_batches(id_images, 8, SEED, process_count=2, num_local_devices=3)
    with pytest.raises(ValueError, match="64"):
        array_batches(id_images, 64, SEED)
    with pytest.raises(ValueError, match="process_index"):
        array_batches(id_images, 8, SEED, process_index=2, process_count=2)


# ----------------------------------------------------------------- devices
def test_shard_places_slice_i_on_device_i():
    devices = jax.local_devices()
    assert len(devices) == 8
    batch = np.arange(8 * 3 * 2, dtype=np.uint8).reshape(8, 3, 2)
    arr = sharding.shard(batch)
    shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start)
    for i, shard in enumerate(shards):
        assert shard.device == devices[i]
        np.testing.assert_array_equal(np.asarray(shard.data), batch[i:i + 1])
    out = jax.pmap(lambda x: x.astype(np.int32).sum(), axis_name="batch")(arr)
    np.testing.assert_array_equal(np.asarray(out), batch.astype(np.int32).sum((1, 2)))
    with pytest.raises(ValueError):
        sharding.shard(batch[:4])


def test_prefetch_to_device_order_and_laziness():
    host = [np.full((8, 2), i, np.float32) for i in range(5)]
    pulled = []

    def source():
        for b in host:
            pulled.append(1)
            yield b

    it = prefetch_to_device(source(), size=2)
    first = next(it)
    assert len(pulled) == 2  # only `size` batches ahead, not the whole stream
    got = [first] + list(it)
    assert len(got) == len(host)
    for g, h in zip(got, host):
        np.testing.assert_array_equal(np.asarray(g), h)
        assert len(g.sharding.device_set) == 8


# ----------------------------------------------------------------- trainer entry points
def _config(**overrides):
    from configs import default
    config = default.get_config()
    config.update(dict(image_size=8, crop_size=8, batch_size=64))
    config.update(overrides)
    return config


def test_local_batch_indices_shards_form_the_global_batch():
    single = local_batch_indices(N, GB, SEED, start_step=5)
    procs = [local_batch_indices(N, GB, SEED, start_step=5, process_index=p, process_count=2)
             for p in range(2)]
    for _ in range(3):
        np.testing.assert_array_equal(np.concatenate([next(p) for p in procs]), next(single))


def test_array_source_stream_is_array_batches():
    config = _config()
    source, batches, steps = pretrain_source(config, start_step=3, process_index=1, process_count=2,
                                             num_local_devices=4)
    ds = arrays.load_array_dataset("digits", image_size=8)
    assert not source.host_cropped
    assert source.num_train_examples == len(ds.train_images)
    assert steps == len(ds.train_images) // 64
    ref = array_batches(ds.train_images, 64, config.seed, start_step=3, process_index=1,
                        process_count=2, num_local_devices=4)
    for _ in range(2):
        batch = next(batches)
        assert batch.shape == (4, 8, 8, 8, 3)
        np.testing.assert_array_equal(batch, next(ref))


def test_knn_arrays_of_array_sources_and_cap():
    ds = arrays.load_array_dataset("digits", image_size=8)
    full = knn_arrays(_config())
    np.testing.assert_array_equal(full.train_images, ds.train_images)
    np.testing.assert_array_equal(full.test_labels, ds.test_labels)
    capped = knn_arrays(_config(knn_max_train_images=100))
    assert capped.train_images.shape == (100, 8, 8, 3)
    keep = knn_subset(len(ds.train_images), 100, seed=0)
    np.testing.assert_array_equal(capped.train_images, ds.train_images[keep])
    np.testing.assert_array_equal(capped.train_labels, ds.train_labels[keep])
    np.testing.assert_array_equal(capped.test_images, ds.test_images)  # queries never capped


def test_array_sources_work_without_tensorflow():
    """The GPU machines have no TensorFlow: block its import and run the
    array path end to end (data, augment and trainer modules)."""
    import subprocess
    import sys
    code = """
import sys
sys.modules['tensorflow'] = None  # any `import tensorflow` now raises ImportError
sys.modules['tensorflow_datasets'] = None
from configs import default
from moco_jax import data
from moco_jax.core import augment
from moco_jax.eval import knn
from moco_jax.training import trainer
c = default.get_config(); c.image_size = 8; c.crop_size = 8
source = data.open_source(c)
assert next(trainer.pretrain_batches(source, c, 0)).shape == (1, 64, 8, 8, 3) and not source.host_cropped
assert len(knn.monitor_dataset(source, c).test_images) == 359
print('ok')
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cifar10_arrays_pretrain_input():
    if not CIFAR10_DIR.is_dir():
        pytest.skip(f"CIFAR-10 mosaics not found: {CIFAR10_DIR} does not exist")
    config = _config(dataset="cifar10_arrays", data_dir=str(CIFAR10_DIR), image_size=32,
                     crop_size=32, batch_size=256, knn_max_train_images=1000)
    source, batches, steps = pretrain_source(config, start_step=10, num_local_devices=8)
    assert source.num_train_examples == 50000 and steps == 195 and not source.host_cropped
    # Uncapped, the kNN arrays are the dataset itself (loaded once, cached).
    ds = knn_arrays(_config(dataset="cifar10_arrays", data_dir=str(CIFAR10_DIR), image_size=32,
                            knn_max_train_images=0))
    assert ds.train_images.shape == (50000, 32, 32, 3)
    idx = next(local_batch_indices(50000, 256, config.seed, start_step=10))
    np.testing.assert_array_equal(next(batches).reshape(256, 32, 32, 3), ds.train_images[idx])
    knn = knn_arrays(config)
    assert knn.train_images.shape == (1000, 32, 32, 3) and knn.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(knn.train_labels, minlength=10).min() > 50  # a spread-out subset


def test_source_registry():
    assert data.source_module("digits") == "sources.arrays"
    assert data.source_module("cifar10_arrays") == "sources.arrays"
    assert data.source_module("image_folder") == "sources.image_folder"
    assert data.source_module("cifar10") == data.source_module("tfds:stl10") == "sources.tfds"
    assert isinstance(data.open_source(_config()), arrays.ArraySource)


def test_train_subset_is_fixed_and_matches_a_knn_bank_of_the_same_size(tmp_path):
    from PIL import Image

    from tiny import tiny_config

    config = tiny_config(train_subset=320, knn_max_train_images=320)
    source, batches, steps = pretrain_source(config, num_local_devices=8)
    assert source.num_train_examples == 320
    assert steps == 320 // config.batch_size
    bank = knn_arrays(config).train_images
    seen = np.concatenate([next(batches).reshape(-1, 8, 8, 3) for _ in range(steps)])
    # One epoch visits exactly the subset, which is the kNN bank.
    as_rows = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert as_rows(seen) == as_rows(bank)
    # Sources that cannot pick examples freely refuse, pointing at the split.
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")  # listing a folder needs no TensorFlow
    folder = data.open_source(tiny_config(dataset="image_folder", data_dir=str(tmp_path), train_split=""))
    assert folder.with_train_subset(0, seed=0) is folder
    with pytest.raises(ValueError, match="train_split"):
        folder.with_train_subset(10, seed=0)
