"""MoCo v1/v2 (He et al., CVPR 2020; Chen et al., 2020): the training step,
written to read like the paper's pseudo-code (facebookresearch/moco `moco/builder.py`).

    f_k.params = m * f_k.params + (1 - m) * f_q.params   # momentum update
    q = normalize(f_q(x_q))                               # queries (B, C)
    k = normalize(f_k(shuffle(x_k)))[unshuffle]           # keys (B, C), no grad
    l_pos = q . k                                         # (B, 1)
    l_neg = q . queue                                     # (B, K)
    loss = CrossEntropy([l_pos, l_neg] / T, label=0)
    f_q.params = SGD(f_q.params, grad(loss))
    queue = enqueue(queue, k)                             # oldest keys leave

The step's functions run inside `jax.pmap(..., axis_name="batch")`: arrays
are one device's share, and collectives over `axis_name` see all devices.
Each device holds B_local images of a global batch of B = n * B_local, and a
shard of K / n rows of the queue.

After the step: what the rest of moco_jax asks of a method (`base.Method`):
its config fields and checks, its encoder heads, its hyper-parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from moco_jax.core import models
from moco_jax.core.config import BOOL, one_of
from moco_jax.core.errors import ConfigError
from moco_jax.core.state import MoCoState
from moco_jax.methods.base import Views, check_bn_groups
from moco_jax.methods.contrastive import info_nce, l2_normalize
from moco_jax.methods.momentum import check_schedule, momentum_at, momentum_update
from moco_jax.methods.shuffle_bn import (SHUFFLE_MODES, all_to_all_shuffled_forward, check_shuffle_mode,
                                         resolve_shuffle_mode, shuffle_permutation, shuffled_forward,
                                         stratified_permutation)


@dataclasses.dataclass(frozen=True)
class MoCoHParams:
    """The static hyper-parameters of one step.

    temperature: T of the softmax over [l_pos, l_neg].
    ema_momentum: m of the key-encoder update (0.999 for ImageNet, 0.99 CIFAR).
    momentum_schedule: "constant" (MoCo v1/v2) or "cosine" (MoCo v3's
      `--moco-m-cos`): m rises from `ema_momentum` to 1 over `total_steps`.
    total_steps: the run's length in steps (the cosine schedule's end).
    shuffle_bn: shuffle keys across devices before the key encoder's BN.
    shuffle_mode: how shuffle BN moves the key images between devices:
      "all_gather" (the reference: every device receives the whole global
      batch and encodes a uniformly random slice of it), "all_to_all"
      (each device sends B_local / n images to every device: n times less
      traffic, and each BN group holds exactly B_local / n images from every
      device; see `all_to_all_shuffled_forward`), or "auto": the all-to-all
      where it applies (`shuffle_bn.resolve_shuffle_mode`).
    image_dtype: the dtype the shuffle moves the key images in: the
      backbone's compute dtype (`model.dtype`), which the backbone casts its
      input to before anything else, so bfloat16 halves the bytes and gives
      the same keys.
    symmetric: also use x_k as queries against keys of x_q (CIFAR demo option).
    axis_name: the pmap axis.
    """

    temperature: float = 0.2
    ema_momentum: float = 0.999
    momentum_schedule: str = "constant"
    total_steps: int = 0
    shuffle_bn: bool = True
    shuffle_mode: str = "auto"
    image_dtype: Any = jnp.float32
    symmetric: bool = False
    axis_name: str = "batch"
    return_features: bool = False  # the step also returns x_q's backbone features (B_local, D), for an online probe

    def __post_init__(self):
        check_shuffle_mode(self.shuffle_mode)
        check_schedule(self.momentum_schedule, self.total_steps)


def shuffle_mode_in_pmap(hp: MoCoHParams, local_batch: int) -> str:
    """"all_gather" or "all_to_all": `hp.shuffle_mode` on this pmap's devices
    (call inside the pmap: it reads the device count from `hp.axis_name`)."""
    return resolve_shuffle_mode(hp.shuffle_mode, local_batch, lax.axis_size(hp.axis_name))


def draw_permutation(rng: jax.Array, hp: MoCoHParams, local_batch: int) -> jax.Array:
    """The shuffle-BN permutation (B,) of one step for `hp.shuffle_mode`
    (call inside the pmap: it reads the device count from `hp.axis_name`)."""
    n = lax.axis_size(hp.axis_name)
    if shuffle_mode_in_pmap(hp, local_batch) == "all_to_all":
        return stratified_permutation(rng, n, local_batch)
    return shuffle_permutation(rng, n * local_batch)


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write this device's keys (B_local, C) into its shard (K/n, C) at `ptr`.

    Every device does the same with its own keys, so the queue as a whole
    receives the whole global batch, and after K / B steps every row has been
    replaced exactly once, oldest first (FIFO). K/n is a multiple of B_local
    (checked at start-up), so a write never wraps around the shard's end.
    """
    queue = lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
    return queue, (ptr + keys.shape[0]) % queue.shape[0]


def _encode(apply_fn, params, batch_stats, x):
    """Train-mode forward: x -> (unit embedding (B, C), new BN statistics)."""
    _, z, stats = _encode_with_features(apply_fn, params, batch_stats, x)
    return z, stats


def _encode_with_features(apply_fn, params, batch_stats, x):
    """Train-mode forward: x -> (backbone features (B, D), unit embedding (B, C), new BN statistics)."""
    (h, z), updates = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    return h, l2_normalize(z), updates["batch_stats"]


def compute_keys(
    state: MoCoState, momentum_params: Any, x_k: jax.Array, perm: jax.Array, hp: MoCoHParams
) -> tuple[jax.Array, Any]:
    """Keys of x_k (B_local, C) from the key encoder, with shuffle BN.

    `perm` (B,) is `draw_permutation`'s for `hp.shuffle_mode`."""
    encode = lambda x: _encode(state.apply_fn, momentum_params, state.momentum_batch_stats, x)  # noqa: E731
    if hp.shuffle_bn:
        mode = shuffle_mode_in_pmap(hp, x_k.shape[0])
        forward = all_to_all_shuffled_forward if mode == "all_to_all" else shuffled_forward
        k, stats = forward(encode, x_k.astype(hp.image_dtype), perm, hp.axis_name)
    else:
        k, stats = encode(x_k)
    return lax.stop_gradient(k), stats


def train_step(
    state: MoCoState, batch: Any, hp: MoCoHParams, views: Views
) -> tuple[MoCoState, dict[str, jax.Array]]:
    """One MoCo step on one device's share of the batch (run under pmap).

    Args:
      state: this device's replica (queue: its shard).
      batch: whatever `views` turns into two views, e.g. uint8 images.
      hp: static hyper-parameters.
      views: (rng, batch) -> (x_q, x_k), each (B_local, H, W, 3); the
        on-device augmentation. Its key differs per device and per step.
    Returns:
      The new state and metrics averaged over the global batch; with
      `hp.return_features` also x_q's backbone features (B_local, D),
      without gradient (for an online probe).
    """
    rng, perm_rng, views_rng = jax.random.split(state.rng, 3)
    x_q, x_k = views(jax.random.fold_in(views_rng, lax.axis_index(hp.axis_name)), batch)

    # The key encoder follows the query encoder *before* this step's update.
    m = momentum_at(state.step, hp.ema_momentum, hp.momentum_schedule, hp.total_steps)
    momentum_params = momentum_update(state.momentum_params, state.params, m)
    pairs = [(x_q, x_k), (x_k, x_q)] if hp.symmetric else [(x_q, x_k)]
    perm_rngs = jax.random.split(perm_rng, len(pairs))
    keys, momentum_batch_stats = [], state.momentum_batch_stats
    for (_, x_key), r in zip(pairs, perm_rngs):
        perm = draw_permutation(r, hp, x_q.shape[0])
        k, momentum_batch_stats = compute_keys(
            state.replace(momentum_batch_stats=momentum_batch_stats), momentum_params, x_key, perm, hp
        )
        keys.append(k)

    def loss_fn(params):
        losses, ranks, features, batch_stats = [], [], [], state.batch_stats
        for (x_query, _), k in zip(pairs, keys):
            h, q, batch_stats = _encode_with_features(state.apply_fn, params, batch_stats, x_query)
            loss, rank = info_nce(q, k, state.queue, hp.temperature, hp.axis_name)
            losses.append(loss.mean())
            ranks.append(rank)
            features.append(lax.stop_gradient(h))
        return sum(losses), (batch_stats, jnp.concatenate(ranks), features[0])

    (loss, (batch_stats, rank, features)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Each device differentiated its local mean loss; the mean of these
    # gradients is the gradient of the global mean loss.
    grads = lax.pmean(grads, hp.axis_name)
    # Per-device BN statistics differ slightly between devices; averaging
    # keeps the state replicated (they are only used at evaluation time).
    batch_stats, momentum_batch_stats = lax.pmean((batch_stats, momentum_batch_stats), hp.axis_name)

    queue, queue_ptr = state.queue, state.queue_ptr
    for k in keys:  # symmetric: keys of both views enter once, after both losses
        queue, queue_ptr = enqueue(queue, queue_ptr, k)

    state = state.apply_gradients(
        grads=grads,
        momentum_params=momentum_params,
        batch_stats=batch_stats,
        momentum_batch_stats=momentum_batch_stats,
        queue=queue,
        queue_ptr=queue_ptr,
        rng=rng,
    )
    metrics = {
        "loss": loss,
        "top1": (rank < 1).mean(),
        "top5": (rank < 5).mean(),
        # The loss is that of the old parameters; a non-finite gradient would
        # make the *new* ones NaN with a finite loss. The host's NaN guard
        # checks both.
        "grad_norm": optax.global_norm(grads),
    }
    metrics = lax.pmean(metrics, hp.axis_name)
    return (state, metrics, features) if hp.return_features else (state, metrics)


# ---------------------------------------------------------------------------
# The method interface (methods/base.py `Method`): MoCo v1/v2 for the rest
# of the library.
# ---------------------------------------------------------------------------
NAME = "moco_v2"
TITLE = "MoCo v1/v2"
FIELDS = {
    "shuffle_mode": one_of(SHUFFLE_MODES),
    "symmetric_loss": BOOL,
    "model.head": one_of(models.HEADS),
}
ONLY_NOTE = "MoCo v3 has no queue and no shuffle BN, is always symmetric, and has its own projector and predictor"
SHAPE_FIELDS = ("model.head", "queue_size")
AUTO_BN_GROUPS = 8  # bn_splits=0: shuffle BN over 8 groups in all, as the MoCo papers' 8 GPUs


def bn_splits(config, num_devices: int) -> int:
    """BN groups per device: `config.bn_splits`, or with bn_splits=0 (auto)
    the most splits, up to AUTO_BN_GROUPS / num_devices, that divide the
    per-device batch into groups of 2 or more images (1 from 8 devices on)."""
    if config.bn_splits != 0:
        return int(config.bn_splits)
    per_device = config.batch_size // max(1, num_devices)
    for splits in range(max(1, AUTO_BN_GROUPS // num_devices), 1, -1):
        if per_device % splits == 0 and per_device // splits >= 2:
            return splits
    return 1


def check(config, num_devices: int) -> None:
    """The queue takes whole global batches; the BN groups and the shuffle fit the per-device batch."""
    batch, queue = config.batch_size, config.queue_size
    if queue <= 0 or queue % batch:
        raise ConfigError(
            f"queue_size={queue} must be a positive multiple of batch_size={batch}: the queue is "
            "overwritten one whole global batch at a time"
        )
    per_device = batch // num_devices
    check_shuffle_mode(config.shuffle_mode, per_device if config.shuffle_bn else None, num_devices)
    check_bn_groups(config, num_devices, bn_splits(config, num_devices))
    if config.symmetric_loss and queue % (2 * batch):
        raise ConfigError(
            f"queue_size={queue} must be a multiple of 2 * batch_size={2 * batch} with symmetric_loss: "
            "both views' keys enter the queue every step"
        )


def warning(config, num_devices: int) -> str:
    """Why this config's shuffle BN is weaker than the papers' (8 BN groups),
    naming the fix; '' when it is not. One group in all shuffles nothing (the
    key encoder's BN sees the query's batch: the cheat shuffle BN prevents);
    auto bn_splits may find fewer than 8 groups when the batch does not divide."""
    if not config.shuffle_bn:
        return ""
    groups = num_devices * bn_splits(config, num_devices)
    per_device = config.batch_size // max(1, num_devices)
    if groups == 1:
        return (f"shuffle BN over a single BN group (1 device, bn_splits={config.bn_splits}) shuffles nothing: the "
                "key encoder's BN statistics mix all images, the leak shuffle BN exists to prevent; set "
                f"--config.bn_splits=0 (auto: {AUTO_BN_GROUPS} groups in all) or a divisor of {per_device} > 1")
    if config.bn_splits == 0 and groups < AUTO_BN_GROUPS and num_devices < AUTO_BN_GROUPS:
        return (f"bn_splits=0 (auto) found {groups} BN groups, not {AUTO_BN_GROUPS}: the {per_device} images per "
                f"device do not split into {AUTO_BN_GROUPS // num_devices} groups of 2 or more; a batch_size that "
                f"divides by {AUTO_BN_GROUPS} gives {AUTO_BN_GROUPS}")
    return ""


def build_encoder(config, backbone: nn.Module, axis_name: str) -> models.MoCoEncoder:
    """Backbone + `model.head` (linear: v1, mlp: v2) to `embed_dim`.

    The head stays in float32 even for bfloat16 backbones: it is tiny, and
    the embeddings are divided by T (as small as 0.07) in the logits, where
    bfloat16's 3 significant digits would show."""
    del axis_name  # no SyncBN in the head
    head = models.ProjectionHead(kind=config.model.head, embed_dim=config.embed_dim, dtype=jnp.float32, name="head")
    return models.MoCoEncoder(backbone=backbone, head=head)


def queue_size(config) -> int:
    return int(config.queue_size)


def hparams(config, total_steps: int, axis_name: str) -> MoCoHParams:
    return MoCoHParams(temperature=config.temperature, ema_momentum=config.momentum,
                       momentum_schedule=config.momentum_schedule, total_steps=total_steps,
                       shuffle_bn=config.shuffle_bn, shuffle_mode=config.shuffle_mode,
                       image_dtype=models.DTYPES[config.model.dtype],
                       symmetric=config.symmetric_loss, axis_name=axis_name)


def negatives(config) -> str:
    return f"queue of {config.queue_size}"


def describe_heads(config) -> str:
    return dict(mlp="an MLP", linear="a linear").get(config.model.head, config.model.head) + " head"
