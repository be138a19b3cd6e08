"""A tiny experiment for tests: the default config shrunk to run in seconds."""

import ml_collections

from configs import default


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """ResNet-10 of width 4 on 8x8 digits; 8 devices x 2 images; K = 32."""
    config = default.get_config()
    config.image_size = 8
    config.crop_size = 8
    config.model.width = 4
    config.embed_dim = 8
    config.batch_size = 16
    config.queue_size = 32
    config.bn_splits = 1
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_batch_size = 512
    config.update(overrides)
    return config
