"""Learning-rate schedules and the SGD optimizer of the MoCo reference."""

from __future__ import annotations

import jax
import optax
from flax import traverse_util

from moco_jax.core.config import LR_SCHEDULES, WEIGHT_DECAY_MASKS, epochs_to_steps, total_steps
from moco_jax.core.errors import ConfigError


def scaled_learning_rate(config) -> float:
    """`config.learning_rate` is per 256 images and scales linearly with the
    global batch (0.03 at 256 in MoCo; 0.06 at 512 in the CIFAR demo)."""
    return config.learning_rate * config.batch_size / 256


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """`cosine` (MoCo v2) or `step` (MoCo v1: x0.1 at each of
    `lr_drop_epochs`), after an optional linear warm-up of `warmup_epochs`.

    The reference changes the rate once per epoch; we change it every step.
    For `step` that is the same curve; for `cosine` the per-step curve lies
    slightly below the reference's per-epoch staircase (at most one epoch's
    decrement), a deliberate smoothing.
    """
    peak = scaled_learning_rate(config)
    total = total_steps(config, steps_per_epoch)
    warmup = epochs_to_steps(config.warmup_epochs, steps_per_epoch)
    if config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=max(total - warmup, 1))
    elif config.lr_schedule == "step":
        boundaries = {epochs_to_steps(e, steps_per_epoch) - warmup: 0.1 for e in config.lr_drop_epochs}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    else:
        raise ConfigError(f"lr_schedule={config.lr_schedule!r} must be one of {', '.join(map(repr, LR_SCHEDULES))}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def weight_decay_mask(params, mode: str):
    """Which parameters get weight decay. `all` is the reference (every
    parameter, BN scale/bias included); `no_bn_bias` exempts 1-D parameters."""
    if mode == "all":
        return jax.tree.map(lambda _: True, params)
    if mode == "no_bn_bias":
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({k: v.ndim > 1 for k, v in flat.items()})
    raise ConfigError(f"weight_decay_mask={mode!r} must be one of {', '.join(map(repr, WEIGHT_DECAY_MASKS))}")


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """PyTorch's SGD(momentum, weight_decay): the decay is *coupled* (added to
    the gradient before the momentum buffer), unlike AdamW-style decay."""
    schedule = learning_rate_schedule(config, steps_per_epoch)
    tx = optax.chain(
        optax.masked(
            optax.add_decayed_weights(config.weight_decay),
            lambda p: weight_decay_mask(p, config.weight_decay_mask),
        ),
        optax.trace(decay=config.sgd_momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule),
    )
    return tx, schedule
