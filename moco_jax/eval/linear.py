"""Linear classification on frozen MoCo features (the standard protocol):
the probe's pure pieces. `moco_jax.training.probe` runs them through the
training loop; `python -m moco_jax.linear_eval` is the program.

`mode=full` (default) is the reference `main_lincls.py` of
facebookresearch/moco: the backbone is frozen and runs with BN in inference
mode (the reference calls `model.eval()` during training, so the running
statistics stay those of pretraining); a linear layer (weights N(0, 0.01),
bias 0) on the pooled features is trained with SGD (momentum 0.9, lr 30 per
256 images, weight decay 0) for 100 epochs, lr x0.1 at epochs 60 and 80;
training images get RandomResizedCrop(scale 0.08-1) of the whole image +
horizontal flip, evaluation images are resized to crop_size / 0.875 and
centre-cropped (the reference's Resize(256) + CenterCrop(224)). Files are
cropped on the host (`data.Source.labelled_train_batches` /
`eval_batches`), in-memory arrays on the device.

`mode=features` extracts the features of every image once (evaluation
view, no augmentation) and fits the same classifier with the same optimizer
on them: minutes become seconds, at the price of the augmentation.

Every step is pmap-ed over all devices of all processes (axis "batch"):
gradients, metrics and the evaluation's hit counts are summed or averaged
over them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from moco_jax import data
from moco_jax.core import augment, image_ops, optim, sharding
from moco_jax.core.config import (FRACTION, RUN_FIELDS, SCALE, STRING, check_fields, check_length,
                                  integer, interval_rules, one_of)
from moco_jax.core.errors import ConfigError
from moco_jax.eval.embed import Encoder

LINEAR_MODES = ("full", "features")  # config.mode
# Every field of a linear-probe config (configs/linear_cifar10.py) and what it may hold.
LINEAR_RULES = {
    **RUN_FIELDS, **data.FIELDS, **optim.FIELDS,
    "pretrained": STRING, "mode": one_of(LINEAR_MODES), "max_train_images": integer(0),
    "crop_size": integer(0, " (0 = the encoder's input size)"), "train_crop_scale": SCALE,
    "eval_crop_fraction": FRACTION, **interval_rules("log_every", "checkpoint_every"),
}


def validate_linear_config(config, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the offending field(s) of a linear-probe
    config (configs/linear_cifar10.py); `num_devices`, if given, the devices
    every step splits its batch over (all devices of all processes)."""
    check_fields(config, LINEAR_RULES)
    check_length(config, ("log_every", "checkpoint_every"))
    if num_devices and config.batch_size % num_devices:
        raise ConfigError(f"batch_size={config.batch_size} must be a multiple of the device count ({num_devices}): "
                          "every step splits its batch over all devices")


# Fields whose change makes a classifier checkpoint unusable: another encoder
# (feature width), another dataset (number of classes), another mode.
CHECKPOINT_FIELDS = ("pretrained", "dataset", "mode")


# ---------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------
def eval_view(images_uint8: jax.Array, crop_size: int, crop_fraction: float, mean, std) -> jax.Array:
    """Resize(int(crop_size / crop_fraction)) + CenterCrop(crop_size) + normalise.

    uint8 (B, H, W, 3) -> float32 (B, crop_size, crop_size, 3). Done as one
    crop-and-resize of the centred square the reference's crop keeps, i.e.
    a side of min(H, W) * crop_size / resize_size input pixels.
    """
    _, height, width, _ = images_uint8.shape
    side = min(height, width) * crop_size / int(crop_size / crop_fraction)
    box = jnp.asarray([(height - side) / 2, (width - side) / 2, side, side], jnp.float32)
    boxes = jnp.broadcast_to(box, (images_uint8.shape[0], 4))
    x = image_ops.crop_and_resize(images_uint8.astype(jnp.float32) / 255.0, boxes, crop_size)
    return image_ops.normalize(x, mean, std)


def train_recipe(crop_size: int, crop_scale, mean, std) -> augment.Recipe:
    """RandomResizedCrop(crop_size, crop_scale) + flip + normalise: the
    reference linear-classification training transform, nothing else."""
    return augment.Recipe(
        crop_size=crop_size, crop_scale=tuple(crop_scale), flip=True, brightness=0.0, contrast=0.0,
        saturation=0.0, hue=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, blur_sigma=(0.1, 2.0),
        mean=tuple(mean), std=tuple(std), order=("flip",),
    )


# ---------------------------------------------------------------------------
# The classifier and its steps.
# ---------------------------------------------------------------------------
def make_classifier(num_classes: int) -> nn.Dense:
    """The reference's `fc`: weights N(0, 0.01), bias 0."""
    return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)


def create_state(config, feature_dim: int, num_classes: int, steps_per_epoch: int) -> train_state.TrainState:
    classifier = make_classifier(num_classes)
    params = classifier.init(jax.random.key(config.seed), jnp.zeros((1, feature_dim)))["params"]
    tx, _ = optim.sgd_optimizer(config, steps_per_epoch)
    return train_state.TrainState.create(apply_fn=classifier.apply, params=params, tx=tx)


def _loss_and_metrics(params, apply_fn, features, labels):
    logits = apply_fn({"params": params}, features)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"loss": loss, "top1": (jnp.argmax(logits, -1) == labels).mean()}


def classifier_step(state, features, labels, axis_name: str | None = None):
    """One SGD step on (B, D) features and (B,) labels; gradients and metrics
    are averaged over `axis_name` when given (pmap)."""
    grads, metrics = jax.grad(_loss_and_metrics, has_aux=True)(state.params, state.apply_fn, features, labels)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    return state.apply_gradients(grads=grads), metrics


def make_full_train_step(backbone: nn.Module, recipe: augment.Recipe, seed: int, host_cropped: bool):
    """pmap-ed (state, backbone variables, uint8 images (n, b, H, W, 3),
    labels (n, b)) -> (state, metrics): the reference's training view
    (RandomResizedCrop + flip, `train_recipe`), the frozen backbone in
    inference mode, one SGD step of the classifier. `host_cropped`: the
    images are already the host's RandomResizedCrops (n, b, S, S, 3) and
    only the flip is drawn here. The augmentation key is derived from (seed,
    step, device), so a resumed run draws the same views."""

    def step(state, backbone_variables, images, labels):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        rng = jax.random.fold_in(rng, jax.lax.axis_index(sharding.AXIS))
        x = augment.augment_view(rng, images, recipe, crop=not host_cropped)
        features = jax.lax.stop_gradient(backbone.apply(backbone_variables, x, train=False))
        return classifier_step(state, features, labels, axis_name=sharding.AXIS)

    return jax.pmap(step, axis_name=sharding.AXIS, donate_argnums=(0,))


def make_features_train_step():
    """pmap-ed (state, features (n, b, D), labels (n, b)) -> (state, metrics):
    one SGD step of the classifier on fixed features."""
    return jax.pmap(functools.partial(classifier_step, axis_name=sharding.AXIS), axis_name=sharding.AXIS,
                    donate_argnums=(0,))


def eval_input(images_uint8: jax.Array, crop_size: int, crop_fraction: float, mean, std,
               host_cropped: bool) -> jax.Array:
    """The evaluation view as the backbone takes it: uint8 (B, H, W, 3) ->
    float32 (B, crop_size, crop_size, 3). Whole images (in-memory sources)
    get Resize + CenterCrop here (`eval_view`); file sources' images already
    are that view (the host cut it) and are only normalised."""
    if host_cropped:
        return image_ops.normalize(images_uint8.astype(jnp.float32) / 255.0, mean, std)
    return eval_view(images_uint8, crop_size, crop_fraction, mean, std)


def correct_counts(logits: jax.Array, labels: jax.Array, valid: jax.Array, axis_name: str | None = None):
    """float32 (3,): (top-1 hits, top-5 hits, examples) among the `valid`
    rows of (B, C) logits, summed over `axis_name` when given."""
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hits = top5 == labels[:, None]
    counts = jnp.stack([jnp.sum(hits[:, 0] & valid), jnp.sum(hits.any(-1) & valid), jnp.sum(valid)])
    counts = counts.astype(jnp.float32)
    return counts if axis_name is None else jax.lax.psum(counts, axis_name)


def make_full_counts_fn(backbone: nn.Module, classifier_apply, crop_size: int, crop_fraction: float, mean, std,
                        host_cropped: bool):
    """pmap-ed (classifier params, backbone variables, uint8 (n, b, H, W, 3),
    labels (n, b), valid (n, b)) -> `correct_counts` over all devices."""

    def counts(params, backbone_variables, images, labels, valid):
        x = eval_input(images, crop_size, crop_fraction, mean, std, host_cropped)
        logits = classifier_apply({"params": params}, backbone.apply(backbone_variables, x, train=False))
        return correct_counts(logits, labels, valid, sharding.AXIS)

    return jax.pmap(counts, axis_name=sharding.AXIS)


def make_features_counts_fn(classifier_apply):
    """pmap-ed (classifier params, features (n, b, D), labels (n, b), valid
    (n, b)) -> `correct_counts` over all devices."""
    return jax.pmap(lambda params, x, y, valid: correct_counts(classifier_apply({"params": params}, x), y, valid,
                                                               sharding.AXIS), axis_name=sharding.AXIS)


def make_features_fn(backbone: nn.Module, crop_size: int, crop_fraction: float, mean, std, host_cropped: bool):
    """pmap-ed (backbone variables, uint8 (n, b, H, W, 3)) -> (n, b, D)
    features of the evaluation view."""
    return jax.pmap(lambda v, x: backbone.apply(v, eval_input(x, crop_size, crop_fraction, mean, std, host_cropped),
                                                train=False), axis_name=sharding.AXIS)


def accuracies(counts) -> dict[str, float]:
    """`correct_counts` -> {"top1", "top5"} in [0, 1]."""
    top1, top5, total = (float(c) for c in np.asarray(counts))
    return {"top1": top1 / max(total, 1.0), "top5": top5 / max(total, 1.0)}


def resolve_config(config, encoder: Encoder) -> ml_collections.ConfigDict:
    """`config` with its 0 fields filled in from the encoder's config:
    crop_size (the encoder's input size) and, for the dataset the encoder was
    pretrained on, image_size (e.g. the digits' upsampled size)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.crop_size:
        config.crop_size = int(encoder.config.crop_size)
    if not config.image_size and encoder.config.to_dict().get("dataset") == config.dataset:
        config.image_size = int(encoder.config.image_size)
    return config


