"""The MoCo v3 training step (Chen, Xie and He, ICCV 2021), read like its
pseudo-code (the paper's Alg. 1, facebookresearch/moco-v3 `moco/builder.py`):

    m = cosine(step)                                   # 1 - (1 - m0)(1 + cos(pi t / T)) / 2
    f_k.params = m * f_k.params + (1 - m) * f_q.params # backbone + projector, not the predictor
    q1, q2 = pred(f_q(x1)), pred(f_q(x2))              # queries (B, C)
    k1, k2 = f_k(x1), f_k(x2)                          # keys (B, C), no gradient
    loss = ctr(q1, k2) + ctr(q2, k1)                   # symmetric
    ctr(q, k) = CE(normalize(q) . normalize(k).T / T, labels = arange(B)) * 2T
    f_q.params = AdamW / LARS(f_q.params, grad(loss))

What differs from MoCo v1/v2 (moco_v2.py): no queue and no
shuffle BN; the negatives of a query are the keys of the *other* images of
the global batch, gathered from all devices; a prediction MLP on the query
side; BN in the MLP heads is SyncBN (its statistics span all devices).

The step's functions run inside `jax.pmap(..., axis_name=hp.axis_name)`;
each device holds B_local images of the global batch B = n * B_local.

After the step: what the rest of moco_jax asks of a method (`base.Method`):
its config fields and checks, its encoder heads, its hyper-parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from moco_jax.core import models
from moco_jax.core.config import integer
from moco_jax.core.errors import ConfigError
from moco_jax.core.models import momentum_subset
from moco_jax.core.state import MoCoState
from moco_jax.methods.base import Views, check_bn_groups, plain_bn_splits
from moco_jax.methods.contrastive import l2_normalize
from moco_jax.methods.momentum import check_schedule, momentum_at, momentum_update


@dataclasses.dataclass(frozen=True)
class MoCoV3HParams:
    """The static hyper-parameters of one step.

    temperature: T of the softmax over the global batch's keys (0.2 for ViT, 1.0 for ResNet).
    ema_momentum: m0 of the key-encoder update (0.99 ViT, 0.996 ResNet).
    momentum_schedule: "cosine" (the paper: m rises from `ema_momentum` to 1
      over `total_steps`) or "constant".
    total_steps: the run's length in steps (the cosine schedule's end).
    axis_name: the pmap axis.
    """

    temperature: float = 0.2
    ema_momentum: float = 0.99
    momentum_schedule: str = "cosine"
    total_steps: int = 0
    axis_name: str = "batch"
    return_features: bool = False  # the step also returns the query view's backbone features

    def __post_init__(self):
        check_schedule(self.momentum_schedule, self.total_steps)


def contrastive_loss(q: jax.Array, k: jax.Array, temperature: float, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """moco-v3 `contrastive_loss` for this device's queries.

    logits = q . all_gather(k).T / T (B_local, B), the positive of query i
    at its global index `device * B_local + i`; cross-entropy times 2T (the
    paper: it makes the loss's gradient scale independent of T).

    Gradients: the keys are constants (momentum encoder; the official
    all_gather has no gradient either); the gradient flows into `q` through
    its L2 normalisation.

    Args:
      q: (B_local, C) predictions, not yet normalised.
      k: (B_local, C) keys of the other view, not yet normalised.
    Returns:
      loss (B_local,) per query, and correct (B_local,): 1.0 where the
      positive has the highest logit.
    """
    q = l2_normalize(q)
    k_all = lax.all_gather(lax.stop_gradient(l2_normalize(k)), axis_name, tiled=True)  # (B, C)
    # Full float32: bfloat16 passes would blur logits divided by T = 0.2.
    logits = jnp.matmul(q, k_all.T, precision=lax.Precision.HIGHEST) / temperature  # (B_local, B)
    labels = lax.axis_index(axis_name) * q.shape[0] + jnp.arange(q.shape[0])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * (2 * temperature)
    return loss, (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)


def _forward(apply_fn, variables, x, method=None):
    """Train-mode forward: x -> (embedding (B, C), new BN statistics)."""
    _, z, stats = _forward_with_features(apply_fn, variables, x, method)
    return z, stats


def _forward_with_features(apply_fn, variables, x, method=None):
    """Train-mode forward: x -> (backbone features (B, D), embedding (B, C), new BN statistics)."""
    (h, z), updates = apply_fn(variables, x, train=True, mutable=["batch_stats"], method=method)
    return h, z, updates["batch_stats"]


def compute_keys(state: MoCoState, momentum_params: Any, views: tuple[jax.Array, jax.Array]):
    """Keys (k1, k2), each (B_local, C), from the momentum encoder; its BN
    (SyncBN in the heads) runs in train mode on each view in turn and its
    running statistics are updated twice, as the official code's two calls."""
    stats, keys = state.momentum_batch_stats, []
    for x in views:
        k, stats = _forward(state.apply_fn, {"params": momentum_params, "batch_stats": stats}, x)
        keys.append(lax.stop_gradient(k))
    return tuple(keys), stats


def symmetric_loss(params: Any, state: MoCoState, views, keys, hp: MoCoV3HParams):
    """ctr(q1, k2) + ctr(q2, k1) as the mean over this device's queries (a
    scalar whose pmean over devices is the official loss), with
    (the query encoder's new BN statistics, per-query top-1 (2 * B_local,),
    the backbone features of the first view (B_local, D), without gradient))."""
    stats, losses, correct, features = state.batch_stats, [], [], []
    for x, k in zip(views, reversed(keys)):  # q1 against k2, then q2 against k1
        h, q, stats = _forward_with_features(state.apply_fn, {"params": params, "batch_stats": stats}, x,
                                             method="query")
        features.append(lax.stop_gradient(h))
        loss, hit = contrastive_loss(q, k, hp.temperature, hp.axis_name)
        losses.append(loss.mean())
        correct.append(hit)
    return losses[0] + losses[1], (stats, jnp.concatenate(correct), features[0])


def loss_and_grads(state: MoCoState, views, hp: MoCoV3HParams):
    """Everything of one step but the optimizer: returns (loss, top-1 hits,
    the gradient of the global mean loss, the new momentum params, the new
    BN statistics of both encoders, the first view's backbone features
    (B_local, D), without gradient). Split out so that tests can compare the
    gradients themselves."""
    m = momentum_at(state.step, hp.ema_momentum, hp.momentum_schedule, hp.total_steps)
    momentum_params = momentum_update(state.momentum_params, momentum_subset(state.params), m)
    keys, momentum_batch_stats = compute_keys(state, momentum_params, views)
    (loss, (batch_stats, correct, features)), grads = jax.value_and_grad(symmetric_loss, has_aux=True)(
        state.params, state, views, keys, hp)
    # Each device differentiated its local mean loss (through SyncBN, whose
    # transpose sums the other devices' terms); the mean of the gradients is
    # the gradient of the global mean loss, as DistributedDataParallel's.
    grads = lax.pmean(grads, hp.axis_name)
    # Backbone BN without SyncBN (ResNet, model.sync_bn=False) would leave the
    # devices' running statistics apart; averaging keeps the state replicated
    # (SyncBN statistics are already equal).
    batch_stats, momentum_batch_stats = lax.pmean((batch_stats, momentum_batch_stats), hp.axis_name)
    return loss, correct, grads, momentum_params, batch_stats, momentum_batch_stats, features


def train_step(state: MoCoState, batch: Any, hp: MoCoV3HParams, views: Views) -> tuple[MoCoState, dict[str, jax.Array]]:
    """One MoCo v3 step on one device's share of the batch (run under pmap).

    Args:
      state: this device's replica (`queue` is None: v3 has none).
      batch: whatever `views` turns into two views, e.g. uint8 images.
      hp: static hyper-parameters (v3 never shuffles and is always symmetric).
      views: (rng, batch) -> (x1, x2), each (B_local, H, W, 3).
    Returns:
      The new state and metrics averaged over the global batch; with
      `hp.return_features` also the first view's backbone features (B_local,
      D), without gradient (for an online probe).
    """
    rng, views_rng = jax.random.split(state.rng)
    x = views(jax.random.fold_in(views_rng, lax.axis_index(hp.axis_name)), batch)
    loss, correct, grads, momentum_params, batch_stats, momentum_batch_stats, features = loss_and_grads(state, x, hp)
    state = state.apply_gradients(grads=grads, momentum_params=momentum_params, batch_stats=batch_stats,
                                  momentum_batch_stats=momentum_batch_stats, rng=rng)
    metrics = lax.pmean({"loss": loss, "top1": correct.mean(), "grad_norm": optax.global_norm(grads)}, hp.axis_name)
    return (state, metrics, features) if hp.return_features else (state, metrics)


# ---------------------------------------------------------------------------
# The method interface (methods/base.py `Method`): MoCo v3 for the rest of
# the library.
# ---------------------------------------------------------------------------
NAME = "moco_v3"
TITLE = "MoCo v3"
FIELDS = {"model.mlp_dim": integer(1)}
ONLY_NOTE = "MoCo v1/v2 heads are sized by model.head and embed_dim"
SHAPE_FIELDS = ("model.mlp_dim",)


def bn_splits(config, num_devices: int) -> int:
    """`config.bn_splits`, auto (0) meaning 1: no shuffle BN to emulate, plain (or Sync) BN."""
    del num_devices
    return plain_bn_splits(config)


def check(config, num_devices: int) -> None:
    """The v1/v2 fields v3 has no use for must say so (a v2 habit carried
    over would silently mean nothing)."""
    if config.queue_size:
        raise ConfigError(f"queue_size={config.queue_size} must be 0 with method='moco_v3': MoCo v3 has no "
                          "queue (the negatives are the other keys of the global batch)")
    if config.shuffle_bn:
        raise ConfigError("shuffle_bn=True has no meaning with method='moco_v3' (it uses SyncBN): set "
                          "shuffle_bn=False")
    check_bn_groups(config, num_devices, bn_splits(config, num_devices))


def warning(config, num_devices: int) -> str:
    del config, num_devices
    return ""


def build_encoder(config, backbone: nn.Module, axis_name: str) -> models.MoCoV3Encoder:
    """Backbone + projector, and the predictor for the queries; their BN is
    SyncBN over `axis_name`. The official code: a 3-layer projector for
    ViT, 2 for ResNet; the predictor ends with the affine-free BN for ViT
    but not for ResNet."""
    vit_backbone = models.is_vit(config)
    mlp = functools.partial(models.MLPHead, hidden_dim=config.model.mlp_dim, out_dim=config.embed_dim,
                            axis_name=axis_name, bn_momentum=config.model.bn_momentum,
                            dtype=models.DTYPES[config.model.dtype])
    return models.MoCoV3Encoder(backbone=backbone, head=mlp(num_layers=3 if vit_backbone else 2, name="head"),
                                predictor=mlp(num_layers=2, last_bn=vit_backbone, name="predictor"))


def queue_size(config) -> int:
    del config
    return 0


def hparams(config, total_steps: int, axis_name: str) -> MoCoV3HParams:
    return MoCoV3HParams(temperature=config.temperature, ema_momentum=config.momentum,
                         momentum_schedule=config.momentum_schedule, total_steps=total_steps, axis_name=axis_name)


def negatives(config) -> str:
    del config
    return "in-batch negatives"


def describe_heads(config) -> str:
    return f"a {config.model.mlp_dim}-wide projector and predictor"
