"""A tiny experiment for tests: the default config shrunk to run in seconds."""

import ml_collections

from configs import default
from moco_jax import data
from moco_jax.eval import knn


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


def pretrain_source(config, start_step=0, process_index=0, process_count=1, num_local_devices=1):
    """What the trainer reads for `config`, for one process of a layout:
    (source with config.train_subset applied, its batch stream, steps per epoch)."""
    source = data.open_source(config).with_train_subset(config.train_subset, config.seed)
    batches = source.train_batches(
        global_batch=config.batch_size, seed=config.seed, start_step=start_step, process_index=process_index,
        process_count=process_count, num_local_devices=num_local_devices, crop_size=config.crop_size,
        crop_scale=tuple(config.crop_scale))
    return source, batches, data.steps_per_epoch(source.num_train_examples, config.batch_size)


def knn_arrays(config):
    """The kNN monitor's labelled images for `config`, as the trainer loads them."""
    return knn.monitor_dataset(data.open_source(config), config)
