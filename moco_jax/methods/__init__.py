"""The MoCo methods, one module each, and the registry that maps
`config.method` to its module (the interface: `base.Method`).

Adding a method is one module with `Method`'s attributes plus one line in
`REGISTRY`; nothing else in moco_jax asks which method it runs.
"""

from __future__ import annotations

import flax.linen as nn

from moco_jax.core import models
from moco_jax.core.errors import ConfigError
from moco_jax.methods import base, moco_v2, moco_v3, online_probe
from moco_jax.methods.base import Method

REGISTRY: dict[str, Method] = {
    moco_v2.NAME: moco_v2,  # MoCo v1 (model.head="linear") and v2
    moco_v3.NAME: moco_v3,
}
NAMES = tuple(REGISTRY)  # the values of config.method


def get(config) -> Method:
    """The module of `config.method`."""
    if config.method not in REGISTRY:
        raise ConfigError(f"method={config.method!r} must be one of {', '.join(map(repr, NAMES))}")
    return REGISTRY[config.method]


def build_encoder(config, axis_name: str = "batch") -> nn.Module:
    """The encoder of an experiment config: `config.model`'s backbone in
    `config.method`'s heads; SyncBN reduces over the pmap axis `axis_name`."""
    return get(config).build_encoder(config, models.build_backbone(config, axis_name), axis_name)


def describe(config) -> str:
    """The encoder in words, e.g. 'ResNet-10 (width 16, cifar stem) with an
    MLP head' or 'ViT-small/16 with a 4096-wide projector and predictor'."""
    return f"{models.describe_backbone(config)} with {get(config).describe_heads(config)}"


# Every method's own fields (each field is in every config: the rules apply whatever the method).
# (the method's rule reads the registry when it checks, not a copy made at import)
FIELDS = {"method": base.Rule("one of " + ", ".join(map(repr, NAMES)), lambda v: v in REGISTRY),
          **base.FIELDS, **online_probe.FIELDS, **{k: v for m in REGISTRY.values() for k, v in m.FIELDS.items()}}
SHAPE_FIELDS = (("method", "embed_dim") + online_probe.SHAPE_FIELDS
                + tuple(f for m in REGISTRY.values() for f in m.SHAPE_FIELDS))


def reader_of(field: str) -> Method | None:
    """The one method that reads `field`, or None for a field all read (or none)."""
    return next((m for m in REGISTRY.values() if field in m.FIELDS), None)
