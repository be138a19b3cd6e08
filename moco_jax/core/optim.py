"""Learning-rate schedules and the optimizers of the MoCo references: SGD
(v1/v2), LARS (v3 ResNet) and AdamW (v3 ViT)."""

from __future__ import annotations

import jax
import optax
from flax import traverse_util

from moco_jax.core import models
from moco_jax.core.config import EPOCHS, MOMENTUM, POSITIVE, epochs_to_steps, number, one_of, total_steps
from moco_jax.core.errors import ConfigError

LR_SCHEDULES = ("cosine", "step")  # config.lr_schedule
WEIGHT_DECAY_MASKS = ("all", "no_bn_bias")  # config.weight_decay_mask
OPTIMIZERS = ("sgd", "lars", "adamw")  # config.optimizer (pretraining; the linear probe's is SGD)
CONV_GRAD_SCALES = ("none", "pytorch_init")  # config.conv_grad_scale

# The fields the optimizers of pretraining and of the linear probe read.
FIELDS = {
    "learning_rate": POSITIVE, "lr_schedule": one_of(LR_SCHEDULES), "lr_drop_epochs": EPOCHS,
    "warmup_epochs": number(0), "weight_decay": number(0), "weight_decay_mask": one_of(WEIGHT_DECAY_MASKS),
    "sgd_momentum": MOMENTUM,
}
# The fields only pretraining's optimizer reads.
PRETRAINING_FIELDS = {"optimizer": one_of(OPTIMIZERS), "lars_trust_coefficient": POSITIVE,
                      "conv_grad_scale": one_of(CONV_GRAD_SCALES)}


def check(config) -> None:
    """`conv_grad_scale` stands in for a smaller init only where every kernel
    is followed by BN (a ResNet) and the step is linear in the gradient (SGD)."""
    if config.conv_grad_scale != "none" and (not models.every_conv_followed_by_bn(config)
                                             or config.optimizer != "sgd"):
        raise ConfigError(f"conv_grad_scale={config.conv_grad_scale!r} needs a ResNet trained with optimizer='sgd' "
                          "(it stands in for a smaller init only where every kernel is followed by BN and the "
                          "step is linear in the gradient)")


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


def _ndim(leaf) -> int:
    """The rank of a parameter; 0 for a leaf that is no array (optax.MaskedNode)."""
    return getattr(leaf, "ndim", 0)


def weight_decay_mask(params, mode: str):
    """Which parameters get weight decay. `all` is the reference (every
    parameter, BN scale/bias included); `no_bn_bias` exempts 1-D parameters.

    Leaves without a shape (the `optax.MaskedNode`s that `optax.multi_transform`
    puts in place of the parameters another transform owns, e.g. the frozen
    ViT patch projection) are not decayed."""
    if mode == "all":
        return jax.tree.map(lambda _: True, params)
    if mode == "no_bn_bias":
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({k: _ndim(v) > 1 for k, v in flat.items()})
    raise ConfigError(f"weight_decay_mask={mode!r} must be one of {', '.join(map(repr, WEIGHT_DECAY_MASKS))}")


def conv_grad_scales(params, mode: str):
    """The multiplier of each parameter's gradient under `conv_grad_scale`.

    `pytorch_init`: every convolution kernel (4-D, HWIO: kernel h x w, I in,
    O out channels) gets c^2 = 6 * I / O, the ratio of the variances of the
    torchvision init, 2 / (h * w * O), and PyTorch's default, 1 / (3 * h * w * I);
    every other parameter 1. Why this is "the init at PyTorch's scale": a
    kernel followed by BN enters the loss only through its direction, so the
    gradient at w / c is c times the gradient at w. SGD from w0 / c (coupled
    decay, momentum) therefore moves along w_t / c, where w_t is SGD from w0
    with the kernel's gradient times c^2 and the decay unchanged: the same
    run, seen at another scale (BN's eps aside). The study of issue 16 uses it
    to ask whether the init's lead is only that larger effective learning rate.
    Leaves that are no array (optax.MaskedNode) get 1.
    """
    if mode == "none":
        return jax.tree.map(lambda _: 1.0, params)
    if mode == "pytorch_init":
        return jax.tree.map(lambda p: 6.0 * p.shape[2] / p.shape[3] if _ndim(p) == 4 else 1.0, params)
    raise ConfigError(f"conv_grad_scale={mode!r} must be one of {', '.join(map(repr, CONV_GRAD_SCALES))}")


def scale_conv_grads(mode: str) -> optax.GradientTransformation:
    """Multiply each gradient by `conv_grad_scales` (stateless)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g, s: g * s, updates, conv_grad_scales(updates, mode)), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def frozen_mask(params, prefixes: tuple[tuple[str, ...], ...]):
    """True for the parameters under one of `prefixes` (`models.frozen_prefixes`):
    those no optimizer step may change (moco-v3's `--stop-grad-conv1` sets
    requires_grad=False on the ViT patch projection, so PyTorch's AdamW skips
    it, decay included)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: any(k[:len(p)] == p for p in prefixes) for k in flat})


def lars(schedule: optax.Schedule, weight_decay: float, momentum: float, trust_coefficient: float,
         mask) -> optax.GradientTransformation:
    """moco-v3 `moco/optimizer.py` LARS. For each parameter in `mask`:
    d = g + wd * p, then d *= trust * |p| / |d| (1 where either norm is 0);
    parameters outside the mask (the reference: biases and BN, p.ndim <= 1)
    keep d = g. Then mu = momentum * mu + d and p -= lr * mu: the learning
    rate applies after the momentum buffer, as in the reference (optax.lars
    scales before it, which differs while the rate changes)."""
    return optax.chain(
        optax.masked(optax.add_decayed_weights(weight_decay), mask),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), mask),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Pretraining's `config.optimizer`, with the learning-rate schedule, the
    weight-decay mask (`config.weight_decay_mask`) and the encoder's frozen
    parameters (`models.frozen_prefixes`) left unchanged:

    * sgd: PyTorch's SGD(momentum, weight_decay): the decay is *coupled*
      (added to the gradient before the momentum buffer); with
      `conv_grad_scale` other than none, the kernels' gradients are first
      scaled (`conv_grad_scales`; only then, so other runs' optimizer state
      keeps its layout);
    * lars: `lars` above, the mask choosing what is decayed *and* adapted;
    * adamw: PyTorch's AdamW (betas 0.9 / 0.999, eps 1e-8), decoupled decay
      lr * wd * p on the masked parameters.
    """
    schedule = learning_rate_schedule(config, steps_per_epoch)
    mask = lambda p: weight_decay_mask(p, config.weight_decay_mask)  # noqa: E731
    name, grad_scale = config.optimizer, config.conv_grad_scale
    if grad_scale != "none" and name != "sgd":
        raise ConfigError(f"conv_grad_scale={grad_scale!r} needs optimizer='sgd' (the optimizer is {name!r})")
    if name == "sgd":
        tx = _sgd(config, schedule, mask, grad_scale)
    elif name == "lars":
        tx = lars(schedule, config.weight_decay, config.sgd_momentum, config.lars_trust_coefficient, mask)
    elif name == "adamw":
        tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay, mask=mask)
    else:
        raise ConfigError(f"optimizer={name!r} must be one of {', '.join(map(repr, OPTIMIZERS))}")
    prefixes = models.frozen_prefixes(config)
    if prefixes:  # (only then: the optimizer state of every other run keeps its layout)
        labels = lambda p: jax.tree.map(lambda f: "frozen" if f else "train", frozen_mask(p, prefixes))  # noqa: E731
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def sgd_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The linear probe's optimizer: PyTorch's SGD(momentum, weight_decay) with
    the learning-rate schedule, as `make_optimizer`'s sgd."""
    schedule = learning_rate_schedule(config, steps_per_epoch)
    return _sgd(config, schedule, lambda p: weight_decay_mask(p, config.weight_decay_mask), "none"), schedule


def _sgd(config, schedule, mask, grad_scale: str) -> optax.GradientTransformation:
    return optax.chain(
        *([scale_conv_grads(grad_scale)] if grad_scale != "none" else []),
        optax.masked(optax.add_decayed_weights(config.weight_decay), mask),
        optax.trace(decay=config.sgd_momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule),
    )
