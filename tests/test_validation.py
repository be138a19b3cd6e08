"""Every start-up check names the offending field, its value and what is allowed."""

import importlib
import re

import ml_collections
import pytest

from moco_jax.eval.linear import validate_linear_config
from moco_jax.training.checks import validate_config
from moco_jax.core.errors import ConfigError
from tiny import tiny_config


def test_tiny_config_is_valid():
    validate_config(tiny_config(), num_devices=8)


@pytest.mark.parametrize(
    "overrides,num_devices,field",
    [
        (dict(queue_size=40), 8, "queue_size"),  # not a multiple of the global batch 16
        (dict(batch_size=12), 8, "batch_size"),  # not a multiple of 8 devices
        (dict(bn_splits=4, batch_size=16), 8, "bn_splits"),  # 2 per device, 4 splits
        (dict(bn_splits=3, batch_size=16), 1, "bn_splits"),
        (dict(temperature=0.0), 8, "temperature"),
        (dict(temperature=-0.1), 8, "temperature"),
        (dict(momentum=1.5), 8, "momentum"),
        (dict(momentum=-0.01), 8, "momentum"),
        (dict(embed_dim=0), 8, "embed_dim"),
        (dict(shuffle_mode="ring"), 8, "shuffle_mode"),
        (dict(bn_splits=2, batch_size=16), 8, "at least 2"),  # 2 per device, 1 per group
        (dict(symmetric_loss=True, batch_size=16, queue_size=48), 8, "symmetric_loss"),
        (dict(shuffle_mode="all_to_all", batch_size=32, queue_size=64), 8, "all_to_all"),  # 4 per device
        (dict(knn_every_steps=5, knn_every_epochs=1.0), 8, "knn_every_steps=5 and knn_every_epochs=1.0"),
    ],
)
def test_invalid_configs_raise_naming_the_field(overrides, num_devices, field):
    with pytest.raises(ValueError, match=field):
        validate_config(tiny_config(**overrides), num_devices=num_devices)


def test_unknown_depth():
    config = tiny_config()
    config.model.depth = 20
    with pytest.raises(ValueError, match="model.depth"):
        validate_config(config, num_devices=8)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("learning_rate", -1.0, "learning_rate=-1.0 must be a number > 0"),
        ("learning_rate", 0.0, "learning_rate=0.0 must be a number > 0"),
        ("model.width", 0, "model.width=0 must be an integer >= 1"),
        ("model.depth", 20, "model.depth=20 must be one of 10, 18, 34, 50"),
        ("model.dtype", "float16", "model.dtype='float16' must be one of 'float32', 'bfloat16'"),
        ("model.stem", "vit", "model.stem='vit' must be one of 'imagenet', 'cifar'"),
        ("model.head", "none", "model.head='none' must be one of 'linear', 'mlp'"),
        ("model.bn_momentum", 1.0, "model.bn_momentum=1.0 must be a number in [0, 1)"),
        ("model.sync_bn", 1, "model.sync_bn=1 must be True or False"),
        ("embed_dim", 0, "embed_dim=0 must be an integer >= 1"),
        ("crop_size", 0, "crop_size=0 must be an integer >= 1"),
        ("crop_scale", (0.0, 1.0), "crop_scale=(0.0, 1.0) must be a pair (low, high) with 0 < low <= high <= 1"),
        ("crop_scale", (0.9, 0.5), "crop_scale=(0.9, 0.5)"),
        ("crop_scale", (0.5,), "crop_scale=(0.5,)"),
        ("image_size", -1, "image_size=-1 must be an integer >= 0"),
        ("augmentation", "simclr", "augmentation='simclr' must be one of 'moco_v1', 'moco_v2', 'cifar'"),
        ("lr_schedule", "linear", "lr_schedule='linear' must be one of 'cosine', 'step'"),
        ("lr_drop_epochs", (-1, 160), "lr_drop_epochs=(-1, 160) must be a list of epochs"),
        ("warmup_epochs", -1.0, "warmup_epochs=-1.0 must be a number >= 0"),
        ("weight_decay", -1e-4, "weight_decay=-0.0001 must be a number >= 0"),
        ("weight_decay_mask", "bias", "weight_decay_mask='bias' must be one of 'all', 'no_bn_bias'"),
        ("sgd_momentum", 1.0, "sgd_momentum=1.0 must be a number in [0, 1)"),
        ("num_epochs", -1, "num_epochs=-1 must be a number >= 0"),
        ("log_every_steps", -1, "log_every_steps=-1 must be an integer >= 0"),
        ("checkpoint_every_epochs", -0.5, "checkpoint_every_epochs=-0.5 must be a number >= 0"),
        ("knn_every_steps", -5, "knn_every_steps=-5 must be an integer >= 0"),
        ("checkpoints_to_keep", 0, "checkpoints_to_keep=0 must be an integer >= 1"),
        ("knn_k", 0, "knn_k=0 must be an integer >= 1"),
        ("knn_temperature", 0.0, "knn_temperature=0.0 must be a number > 0"),
        ("eval_batch_size", 0, "eval_batch_size=0 must be an integer >= 1"),
        ("train_subset", -1, "train_subset=-1 must be an integer >= 0"),
        ("knn_max_train_images", -1, "knn_max_train_images=-1 must be an integer >= 0"),
        ("knn_center_crop_fraction", 0.0, "knn_center_crop_fraction=0.0 must be a number in (0, 1]"),
        ("input_threads", -1, "input_threads=-1 must be an integer >= 0"),
        ("shuffle_buffer", 0, "shuffle_buffer=0 must be an integer >= 1"),
        ("seed", -1, "seed=-1 must be an integer >= 0"),
        ("seed", 1.5, "seed=1.5 must be an integer >= 0"),
        ("batch_size", 0, "batch_size=0 must be an integer >= 1"),
        ("queue_size", -1, "queue_size=-1 must be an integer >= 0"),
        ("queue_size", 0, "queue_size=0 must be a positive multiple of batch_size=16"),
        ("method", "moco_v4", "method='moco_v4' must be one of 'moco_v2', 'moco_v3'"),
        ("optimizer", "adam", "optimizer='adam' must be one of 'sgd', 'lars', 'adamw'"),
        ("model.vit", "huge", "model.vit='huge' must be one of"),
        ("model.conv_init", "xavier", "model.conv_init='xavier' must be one of 'torchvision', 'pytorch'"),
        ("bn_splits", -1, "bn_splits=-1 must be an integer >= 0 (0 = auto)"),
        ("temperature", float("nan"), "temperature=nan must be a number > 0"),
        ("dataset", "", "dataset='' must be a non-empty string"),
        ("image_key", "", "image_key='' must be a non-empty string"),
        ("skip_corrupt_images", "yes", "skip_corrupt_images='yes' must be True or False"),
    ],
)
def test_every_field_is_checked_with_what_it_may_be(field, value, expected):
    config = tiny_config().to_dict()  # a plain dict: any value, of any type
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(ConfigError) as error:
        validate_config(ml_collections.ConfigDict(config, type_safe=False), num_devices=8)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_all_bad_fields_are_named_at_once():
    config = tiny_config(learning_rate=-1.0, knn_k=0)
    config.model.width = 0
    with pytest.raises(ConfigError, match=r"learning_rate=-1.0 .*; model.width=0 .*; knn_k=0"):
        validate_config(config, num_devices=8)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(num_epochs=0, num_train_steps=-1), "give no training step"),
        (dict(crop_size=16), "crop_size=16 is larger than the 8x8 digits images"),  # tiny: image_size 8
        (dict(dataset="cifar10_arrays", image_size=16), "image_size=16 must be 0 or 32"),
        (dict(dataset="cifar10_arrays", image_size=0, crop_size=48), "crop_size=48 is larger than the 32x32"),
    ],
)
def test_relations_between_fields(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_config(tiny_config(**overrides), num_devices=8)


def test_a_crop_larger_than_image_size_is_fine_for_files():
    """Image folders and tensorflow-datasets are cropped from the decoded
    files; image_size is only the linear probe's decode size there."""
    validate_config(tiny_config(dataset="imagenette/320px-v2", image_size=8, crop_size=32), num_devices=8)


def test_fields_a_config_lacks_are_left_to_their_readers():
    config = tiny_config()
    del config["knn_center_crop_fraction"]
    validate_config(config, num_devices=8)


def test_validation_errors_are_value_errors_too():
    """Library users catching ValueError keep working."""
    with pytest.raises(ValueError):
        validate_config(tiny_config(learning_rate=0.0), num_devices=8)


@pytest.mark.parametrize("name", ["linear_cifar10", "linear_imagenet"])
def test_shipped_linear_configs_are_valid(name):
    validate_linear_config(importlib.import_module(f"configs.{name}").get_config(), num_devices=8)


@pytest.mark.parametrize(
    "overrides, num_devices, expected",
    [
        (dict(mode="fast"), 8, "mode='fast' must be one of 'full', 'features'"),
        (dict(learning_rate=0.0), 8, "learning_rate=0.0 must be a number > 0"),
        (dict(batch_size=12), 8, "batch_size=12 must be a multiple of the device count (8)"),
        (dict(crop_size=-1), 8, "crop_size=-1 must be an integer >= 0 (0 = the encoder's input size)"),
        (dict(train_crop_scale=(0.08, 1.5)), 8, "train_crop_scale=(0.08, 1.5)"),
        (dict(eval_crop_fraction=1.2), 8, "eval_crop_fraction=1.2 must be a number in (0, 1]"),
        (dict(max_train_images=-1), 8, "max_train_images=-1 must be an integer >= 0"),
        (dict(num_epochs=0), 8, "give no training step"),
        (dict(log_every_steps=5, log_every_epochs=1.0), 8, "log_every_steps=5 and log_every_epochs=1.0"),
        (dict(lr_schedule="cosine_restarts"), 8, "lr_schedule='cosine_restarts'"),
    ],
)
def test_invalid_linear_configs_name_the_field(overrides, num_devices, expected):
    config = importlib.import_module("configs.linear_cifar10").get_config()
    config.update(overrides)
    with pytest.raises(ConfigError) as error:
        validate_linear_config(config, num_devices)
    assert expected in str(error.value)


def test_features_mode_splits_its_batch_over_the_devices_too():
    """Both modes run every step on all devices (features mode no longer on one)."""
    config = importlib.import_module("configs.linear_cifar10").get_config()
    config.update(dict(mode="features", batch_size=12))
    with pytest.raises(ConfigError, match="batch_size=12 must be a multiple of the device count"):
        validate_linear_config(config, num_devices=8)
    config.batch_size = 16
    validate_linear_config(config, num_devices=8)


def test_sweep_points_are_checked_before_any_runs():
    from moco_jax.launch import sweep

    config = tiny_config()
    sweep.check_points(config, [{"seed": 1}, {"model.width": 8}], "sweep.py")
    for points, expected in [
        ([{"learning_rat": 0.1}], "no field 'learning_rat'; did you mean learning_rate?"),
        ([{"model.width": "wide"}], "model.width='wide' must be of type int"),
        ([{"seed": 1}, {"model.dtype": "float16"}], "model.dtype='float16' must be one of"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            sweep.check_points(config, points, "sweep.py")
    # What depends on the devices is each point's own start-up check.
    sweep.check_points(config, [{"queue_size": 24}], "sweep.py")
