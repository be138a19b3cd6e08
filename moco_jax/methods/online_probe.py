"""An online linear probe during pretraining (solo-learn's online
classifier): a linear layer on the backbone features of the query view,
without gradient into the encoder, trained with its own SGD inside the
pretraining step on the labels the source provides. It measures the
features as they train, at no cost beyond one small matrix product per
step; the MoCo update is the same with it on or off (the features are an
output of the step's own forward pass, `hp.return_features`).

    config.online_probe = True      # off by default
    config.online_probe_lr = 0.1    # SGD momentum 0.9, no weight decay, constant

Its state, `MoCoState.probe` = {"params": ..., "opt_state": ...}, is
checkpointed with the rest; it is None when the probe is off.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from moco_jax.core.config import BOOL, POSITIVE

FIELDS = {"online_probe": BOOL, "online_probe_lr": POSITIVE}
SHAPE_FIELDS = ("online_probe",)  # a checkpoint holds its state, or not
MOMENTUM = 0.9


def classifier(num_classes: int) -> nn.Dense:
    return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)


def optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.sgd(learning_rate, momentum=MOMENTUM)


def init(rng, feature_dim: int, num_classes: int, learning_rate: float) -> dict[str, Any]:
    """The probe's state: {"params": the classifier's, "opt_state": its SGD's}."""
    params = classifier(num_classes).init(rng, jnp.zeros((1, feature_dim)))["params"]
    return {"params": params, "opt_state": optimizer(learning_rate).init(params)}


def _loss(params, features, labels, num_classes):
    """Cross-entropy and top-1 over the labelled examples (label >= 0; -1,
    an unlabelled example, is ignored as solo-learn's ignore_index=-1)."""
    logits = classifier(num_classes).apply({"params": params}, features)
    labelled = labels >= 0
    count = jnp.maximum(labelled.sum(), 1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    hits = jnp.argmax(logits, -1) == labels
    return jnp.sum(loss * labelled) / count, jnp.sum(hits & labelled) / count


def update(probe: dict[str, Any], features: jax.Array, labels: jax.Array, *, num_classes: int,
           learning_rate: float, axis_name: str) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One SGD step of the probe on this device's (B, D) features and (B,)
    labels, gradients averaged over `axis_name`: (probe, {"online_loss",
    "online_top1"} averaged over the global batch)."""
    (loss, top1), grads = jax.value_and_grad(_loss, has_aux=True)(probe["params"], lax.stop_gradient(features),
                                                                 labels, num_classes)
    grads = lax.pmean(grads, axis_name)
    updates, opt_state = optimizer(learning_rate).update(grads, probe["opt_state"], probe["params"])
    probe = {"params": optax.apply_updates(probe["params"], updates), "opt_state": opt_state}
    return probe, lax.pmean({"online_loss": loss, "online_top1": top1}, axis_name)


def with_probe(moco_step: Callable, *, num_classes: int, learning_rate: float, axis_name: str) -> Callable:
    """A pretraining step that also trains the probe: (state, (images,
    labels (B,))) -> (state, metrics with online_loss / online_top1).
    `moco_step(state, images)` must return (state, metrics, features)."""

    def step(state, batch):
        images, labels = batch
        state, metrics, features = moco_step(state, images)
        probe, probe_metrics = update(state.probe, features, labels, num_classes=num_classes,
                                      learning_rate=learning_rate, axis_name=axis_name)
        return state.replace(probe=probe), {**metrics, **probe_metrics}

    return step

