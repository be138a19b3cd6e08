"""Configs stored by older versions of moco_jax (in checkpoints and exported
files), read as today's: the one place that knows which fields a version
lacked and what its runs were trained with. Everything else reads a
config's fields directly, with no default of its own.
"""

from __future__ import annotations

import ml_collections

# What a run written before each field existed was trained with.
FIELD_DEFAULTS = {
    "method": "moco_v2", "optimizer": "sgd", "momentum_schedule": "constant", "conv_grad_scale": "none",
    "model.arch": "resnet", "model.vit": "small", "model.patch_size": 16, "model.stop_grad_patch": False,
    "model.mlp_dim": 4096, "model.zero_init_residual": False, "model.conv_init": "torchvision",
    "model.remat": "none",
    "online_probe": False, "online_probe_lr": 0.1,
    # How files are found and read, not what is read (the same images and crops either way): today's defaults.
    "index_dir": "", "input_read_threads": 4,
    # Where grain's crops are resized, not which: the same boxes of the same images, the pixels within 1 of the
    # host's resize (which runs before it existed used); today's default, so that resuming one is not reported.
    "resize_on_device": True,
}


def upgraded(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a stored `config` with every field in FIELD_DEFAULTS that it
    lacks set to what its run was trained with."""
    config = ml_collections.ConfigDict(config.to_dict())
    for name, value in FIELD_DEFAULTS.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            if parent not in node:
                node[parent] = ml_collections.ConfigDict()
            node = node[parent]
        if leaf not in node:
            node[leaf] = value
    return config
