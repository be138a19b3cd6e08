"""Every start-up check names the offending field."""

import pytest

from moco_jax.core.config import validate_config
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
