"""The optimizers of core/optim.py build, initialise and step on every
combination of method, optimizer, weight-decay mask, frozen ViT patch
projection and conv_grad_scale that validate_config accepts; shapes only
(jax.eval_shape), on tiny models."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import moco_v3_tiny
from moco_jax.training import checks
from moco_jax.core import optim
from moco_jax.core.errors import ConfigError
from moco_jax import methods
from tiny import tiny_config

N_DEV = 8
STEPS_PER_EPOCH = 10


def _v2_resnet():
    return tiny_config()  # queue 32, shuffle BN, ResNet-10 of width 4 on 8x8 crops


def _v3_resnet():
    return tiny_config(method="moco_v3", queue_size=0, shuffle_bn=False, momentum_schedule="cosine")


def _v3_vit():
    config = moco_v3_tiny.get_config()  # the "test" ViT, 4x4 patches
    config.update(dict(batch_size=16, image_size=16, crop_size=16))
    return config


METHODS = {"v2_resnet": _v2_resnet, "v3_resnet": _v3_resnet, "v3_vit": _v3_vit}
AXES = dict(method=tuple(METHODS), optimizer=optim.OPTIMIZERS, mask=optim.WEIGHT_DECAY_MASKS,
            stop_grad_patch=(True, False), conv_grad_scale=optim.CONV_GRAD_SCALES)


def _config(method, optimizer, mask, stop_grad_patch, conv_grad_scale):
    config = METHODS[method]()
    config.update(dict(optimizer=optimizer, weight_decay_mask=mask, conv_grad_scale=conv_grad_scale))
    config.model.stop_grad_patch = stop_grad_patch
    return config


@functools.lru_cache(maxsize=None)
def _param_shapes(method, stop_grad_patch):
    """The query encoder's parameters as ShapeDtypeStructs (nothing computed)."""
    config = _config(method, "sgd", "all", stop_grad_patch, "none")
    encoder = methods.build_encoder(config, axis_name=None)
    image = jnp.zeros((2, config.crop_size, config.crop_size, 3))
    method_fn = "query" if hasattr(encoder, "query") else None
    init = lambda r: encoder.init(r, image, train=False, method=method_fn)["params"]  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0))


def _accepted_optimizer(combo):
    """(config, optimizer) of a combination, or None where it is refused."""
    config = _config(*combo)
    try:
        checks.validate_config(config, num_devices=N_DEV)
        return config, optim.make_optimizer(config, STEPS_PER_EPOCH)[0]
    except ConfigError:
        return None


def test_every_accepted_combination_initialises_and_steps():
    accepted, refused = [], []
    for combo in itertools.product(*AXES.values()):
        built = _accepted_optimizer(combo)
        if built is None:
            refused.append(combo)
            continue
        _, tx = built
        params = _param_shapes(combo[0], combo[3])
        state = jax.eval_shape(tx.init, params)
        updates, _ = jax.eval_shape(tx.update, params, state, params)
        assert jax.tree.structure(updates) == jax.tree.structure(params), combo
        assert all(jax.tree.leaves(jax.tree.map(lambda u, p: (u.shape, u.dtype) == (p.shape, p.dtype), updates, params))), combo
        accepted.append(combo)
    assert len(accepted) > 20, (len(accepted), len(refused))
    assert len(accepted) + len(refused) == np.prod([len(v) for v in AXES.values()])
    for optimizer in ("adamw", "lars"):  # the frozen patch projection under the no_bn_bias mask
        assert ("v3_vit", optimizer, "no_bn_bias", True, "none") in accepted
    assert all(c[4] == "none" or (c[1] == "sgd" and c[0] != "v3_vit") for c in accepted)


def test_masks_skip_the_leaves_multi_transform_masks_out():
    """Inside optax.multi_transform the inner optimizer's masks see
    optax.MaskedNode leaves (the frozen patch projection): not decayed, not scaled."""
    params = {"patch_embed": {"kernel": optax.MaskedNode(), "bias": optax.MaskedNode()},
              "block": {"kernel": np.ones((3, 3, 2, 4)), "bias": np.ones(4)}}
    mask = optim.weight_decay_mask(params, "no_bn_bias")
    assert mask["block"] == {"kernel": True, "bias": False}
    assert mask["patch_embed"] == {"kernel": False, "bias": False}
    scales = optim.conv_grad_scales(params, "pytorch_init")
    assert scales["block"] == {"kernel": pytest.approx(6.0 * 2 / 4), "bias": 1.0}
