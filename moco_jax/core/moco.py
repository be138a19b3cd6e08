"""The MoCo training step, written to read like the paper's pseudo-code.

    f_k.params = m * f_k.params + (1 - m) * f_q.params   # momentum update
    q = normalize(f_q(x_q))                               # queries (B, C)
    k = normalize(f_k(shuffle(x_k)))[unshuffle]           # keys (B, C), no grad
    l_pos = q . k                                         # (B, 1)
    l_neg = q . queue                                     # (B, K)
    loss = CrossEntropy([l_pos, l_neg] / T, label=0)
    f_q.params = SGD(f_q.params, grad(loss))
    queue = enqueue(queue, k)                             # oldest keys leave

Every function here runs inside `jax.pmap(..., axis_name="batch")`: arrays
are one device's share, and collectives over `axis_name` see all devices.
Each device holds B_local images of a global batch of B = n * B_local, and a
shard of K / n rows of the queue.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from moco_jax.core.errors import ConfigError
from moco_jax.core.state import MoCoState

Views = Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]]
SHUFFLE_MODES = ("all_gather", "all_to_all")
MOMENTUM_SCHEDULES = ("constant", "cosine")


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
      batch and encodes a uniformly random slice of it) or "all_to_all"
      (each device sends B_local / n images to every device: n times less
      traffic, and each BN group holds exactly B_local / n images from every
      device; see `all_to_all_shuffled_forward`).
    symmetric: also use x_k as queries against keys of x_q (CIFAR demo option).
    axis_name: the pmap axis.
    """

    temperature: float = 0.2
    ema_momentum: float = 0.999
    momentum_schedule: str = "constant"
    total_steps: int = 0
    shuffle_bn: bool = True
    shuffle_mode: str = "all_gather"
    symmetric: bool = False
    axis_name: str = "batch"

    def __post_init__(self):
        check_shuffle_mode(self.shuffle_mode)
        if self.momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ConfigError(f"momentum_schedule={self.momentum_schedule!r} must be one of "
                              f"{', '.join(map(repr, MOMENTUM_SCHEDULES))}")
        if self.momentum_schedule == "cosine" and self.total_steps <= 0:
            raise ValueError("momentum_schedule='cosine' needs the run's total_steps (make_train_step's total_steps)")


def check_shuffle_mode(mode: str, local_batch: int | None = None, num_devices: int | None = None) -> None:
    """The one check of `shuffle_mode`: a known mode and, for "all_to_all"
    with the sizes given, a per-device batch that splits evenly over the
    devices (each device sends B_local / n images to every device)."""
    if mode not in SHUFFLE_MODES:
        raise ConfigError(f"shuffle_mode={mode!r} must be one of {', '.join(map(repr, SHUFFLE_MODES))}")
    if mode == "all_to_all" and local_batch is not None and local_batch % num_devices:
        raise ConfigError(
            f"shuffle_mode='all_to_all' needs the per-device batch ({local_batch}) to be a multiple of the "
            f"{num_devices} devices"
        )


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit length, as `torch.nn.functional.normalize(x, dim=1)`.

    Written with rsqrt of the clamped squared norm rather than `norm`: the
    gradient of `jnp.linalg.norm` is NaN at a zero row, this one is finite
    there (as PyTorch's)."""
    return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def momentum_update(momentum_params: Any, params: Any, momentum: float) -> Any:
    """theta_k <- m * theta_k + (1 - m) * theta_q (optax takes the step 1 - m)."""
    return optax.incremental_update(params, momentum_params, step_size=1.0 - momentum)


def momentum_at(step: jax.Array | int, base: float, schedule: str, total_steps: int) -> jax.Array | float:
    """The key encoder's momentum m for the update before optimizer step
    `step` (0-based). "constant": `base`. "cosine" (moco-v3
    `adjust_moco_momentum`, per iteration):
        m = 1 - (1 - base) * (1 + cos(pi * step / total_steps)) / 2,
    `base` at step 0, 1 at the end of training."""
    if schedule == "constant":
        return base
    t = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def shuffle_permutation(rng: jax.Array, global_batch: int) -> jax.Array:
    """A permutation of the global batch. `rng` must be the same on every
    device (it comes from the replicated state), so all devices agree."""
    return jax.random.permutation(rng, global_batch)


def draw_permutation(rng: jax.Array, hp: MoCoHParams, local_batch: int) -> jax.Array:
    """The shuffle-BN permutation (B,) of one step for `hp.shuffle_mode`
    (call inside the pmap: it reads the device count from `hp.axis_name`)."""
    n = lax.axis_size(hp.axis_name)
    if hp.shuffle_mode == "all_to_all":
        return stratified_permutation(rng, n, local_batch)
    return shuffle_permutation(rng, n * local_batch)


def shuffled_forward(
    encode: Callable[[jax.Array], tuple[jax.Array, Any]],
    x: jax.Array,
    perm: jax.Array,
    axis_name: str,
) -> tuple[jax.Array, Any]:
    """Shuffle BN: encode a random slice of the global batch, return our own keys.

    Each device gathers every device's images (B, ...), encodes the slice
    `perm[i*B_local:(i+1)*B_local]` of them, so its BN statistics come from a
    random mix of examples instead of the very examples its queries came from
    (which would let the model "cheat" through BN statistics), gathers all
    encodings and keeps the rows that belong to its own x, in order.

    Args:
      encode: x (B_local, ...) -> (keys (B_local, C), aux).
      x: (B_local, H, W, 3) this device's key images.
      perm: (B,) the shared permutation of the global batch.
    Returns:
      keys (B_local, C) with keys[j] the encoding of x[j], and `encode`'s aux.
    """
    local = x.shape[0]
    start = lax.axis_index(axis_name) * local
    x_all = lax.all_gather(x, axis_name, tiled=True)
    k_shuffled, aux = encode(x_all[lax.dynamic_slice_in_dim(perm, start, local)])
    k_all = lax.all_gather(k_shuffled, axis_name, tiled=True)  # row j encodes x_all[perm[j]]
    unshuffle = jnp.argsort(perm)  # row unshuffle[i] of k_all encodes x_all[i]
    return k_all[lax.dynamic_slice_in_dim(unshuffle, start, local)], aux


def stratified_permutation(rng: jax.Array, num_devices: int, local_batch: int) -> jax.Array:
    """A permutation of the global batch for `all_to_all_shuffled_forward`.

    Slice j, `perm[j*B_local:(j+1)*B_local]`, lists the global indices device
    j encodes; it holds exactly c = B_local / n indices from every device's
    share (which of a device's images go to which device is uniformly
    random), in a uniformly random order. `rng` must be the same on every
    device (it comes from the replicated state), so all devices agree.

    Returns:
      (B,) int32 with B = num_devices * local_batch.
    """
    n, b = num_devices, local_batch
    check_shuffle_mode("all_to_all", b, n)
    c = b // n
    send_rng, order_rng = jax.random.split(rng)
    # Row s: device s's local rows in a random order; chunk j of it goes to device j.
    sent = jax.random.permutation(send_rng, jnp.broadcast_to(jnp.arange(b), (n, b)), axis=1, independent=True)
    global_rows = sent.reshape(n, n, c) + (jnp.arange(n) * b)[:, None, None]  # (source, destination, c)
    slices = global_rows.transpose(1, 0, 2).reshape(n, b)  # (destination, B_local)
    # A random order inside each slice, so that sub-groups of split BN
    # (bn_splits > 1) are random mixes too, not one source device each.
    return jax.random.permutation(order_rng, slices, axis=1, independent=True).reshape(-1)


def all_to_all_shuffled_forward(
    encode: Callable[[jax.Array], tuple[jax.Array, Any]],
    x: jax.Array,
    perm: jax.Array,
    axis_name: str,
) -> tuple[jax.Array, Any]:
    """Shuffle BN with one `all_to_all` each way instead of two all-gathers.

    Computes exactly what `shuffled_forward(encode, x, perm, axis_name)`
    computes, for a `perm` from `stratified_permutation`: device j encodes
    the images `perm[j*B_local:(j+1)*B_local]` as one BN group (in that
    order), and every device gets back the keys of its own x, in order. It
    relies on the stratification: each device sends B_local / n of its
    images to every device (an arbitrary permutation would not fit one
    fixed-size all_to_all, and would silently give wrong keys).

    What changes compared with the reference all-gather shuffle:
      * traffic and memory: a device receives (n-1) * B_local / n images
        instead of (n-1) * B_local, n times less, and holds B_local images
        instead of the whole global batch B, so its memory no longer grows
        with the device count (likewise for the keys sent back);
      * the BN groups: with the all-gather shuffle a group is a uniformly
        random B_local-subset of the global batch (the number of images from
        any one device is hypergeometric, and may even be all B_local of them);
        here every group holds exactly B_local / n images from every device,
        chosen at random. So a key shares its BN group with exactly
        B_local / n - 1 images of its own query's device, where the
        all-gather shuffle gives (B_local - 1)^2 / (B - 1) on average (about
        the same) with some spread. Either way the key's BN statistics are
        not those of its query's group, which is what shuffle BN is for.
      * it needs B_local to be a multiple of n (B_local >= n).

    Args:
      encode: x (B_local, ...) -> (keys (B_local, C), aux).
      x: (B_local, H, W, 3) this device's key images.
      perm: (B,) from `stratified_permutation`, the same on every device.
    Returns:
      keys (B_local, C) with keys[j] the encoding of x[j], and `encode`'s aux.
    """
    n, b = lax.axis_size(axis_name), x.shape[0]
    c, me = b // n, lax.axis_index(axis_name)
    slices = perm.reshape(n, b)  # row j: the global indices device j encodes
    # all_to_all delivers source 0's chunk first, then source 1's, ...: the
    # arrival order of row j is its indices sorted (stably) by source device.
    by_source = jnp.argsort(slices // b, axis=1, stable=True)  # (n, B_local)
    arrival = jnp.take_along_axis(slices, by_source, axis=1)  # (destination, B_local)
    # Our local rows, chunk j of them bound for device j, in j's arrival order.
    send = lax.dynamic_index_in_dim(arrival.reshape(n, n, c), me, axis=1, keepdims=False).reshape(b) - me * b
    received = lax.all_to_all(x[send], axis_name, 0, 0, tiled=True)  # row r: image arrival[me, r]
    my_by_source = lax.dynamic_index_in_dim(by_source, me, axis=0, keepdims=False)
    keys, aux = encode(received[jnp.argsort(my_by_source)])  # row m encodes perm[me * B_local + m]
    returned = lax.all_to_all(keys[my_by_source], axis_name, 0, 0, tiled=True)  # row r: key of x[send[r]]
    return returned[jnp.argsort(send)], aux


def info_nce(
    q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float, axis_name: str
) -> tuple[jax.Array, jax.Array]:
    """InfoNCE against the whole queue while each device holds only a shard.

    The logits of one query are [q.k, q.queue_1, ..., q.queue_K] / T with the
    positive at index 0, and its loss is logsumexp(logits) - logits[0]. The K
    negatives are spread over n devices, so every device scores *all* B
    queries against its own K/n rows, and the log-sum-exp is combined across
    devices: a shared max (pmax) for stability, then the sums of exponentials
    are reduced and scattered back to the devices owning the queries
    (psum_scatter). The result equals the single-device computation on the
    full queue while per-device queue memory stays K*C/n.

    Gradients: `k` and `queue` are constants (stop_gradient: keys come from
    the momentum encoder, and the queue holds past keys); the gradient flows
    into `q`, including back through the all_gather to the device that owns
    each query. The max shift has no gradient because log-sum-exp does not
    depend on it.

    Args:
      q: (B_local, C) unit query embeddings.
      k: (B_local, C) unit keys; k[j] is the positive of q[j].
      queue: (K / n, C) this device's shard of the negatives.
    Returns:
      loss (B_local,) per query, and rank (B_local,): how many negatives score
      above the positive (0 means top-1 correct).
    """
    k, queue = lax.stop_gradient(k), lax.stop_gradient(queue)
    local = q.shape[0]
    start = lax.axis_index(axis_name) * local

    l_pos = jnp.sum(q * k, axis=-1) / temperature  # (B_local,)
    q_all = lax.all_gather(q, axis_name, tiled=True)  # (B, C)
    # Full float32 precision: the default TF32/bf16 matmul passes on GPU/TPU
    # would score the negatives less exactly than l_pos, which matters at
    # T = 0.07; this matmul is a tiny part of the step.
    l_neg = jnp.matmul(q_all, queue.T, precision=lax.Precision.HIGHEST) / temperature  # (B, K/n)
    l_pos_all = lax.all_gather(lax.stop_gradient(l_pos), axis_name, tiled=True)  # (B,)

    shift_all = lax.pmax(jnp.maximum(lax.stop_gradient(l_neg).max(axis=1), l_pos_all), axis_name)
    sum_neg = lax.psum_scatter(
        jnp.exp(l_neg - shift_all[:, None]).sum(axis=1), axis_name, scatter_dimension=0, tiled=True
    )  # (B_local,) sum over all K negatives of our own queries
    shift = lax.dynamic_slice_in_dim(shift_all, start, local)
    log_sum_exp = shift + jnp.log(jnp.exp(l_pos - shift) + sum_neg)
    loss = log_sum_exp - l_pos

    above = (lax.stop_gradient(l_neg) > l_pos_all[:, None]).sum(axis=1).astype(jnp.float32)
    rank = lax.psum_scatter(above, axis_name, scatter_dimension=0, tiled=True)
    return loss, rank


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
    (_, z), updates = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    return l2_normalize(z), updates["batch_stats"]


def compute_keys(
    state: MoCoState, momentum_params: Any, x_k: jax.Array, perm: jax.Array, hp: MoCoHParams
) -> tuple[jax.Array, Any]:
    """Keys of x_k (B_local, C) from the key encoder, with shuffle BN.

    `perm` (B,) is `draw_permutation`'s for `hp.shuffle_mode`."""
    encode = lambda x: _encode(state.apply_fn, momentum_params, state.momentum_batch_stats, x)  # noqa: E731
    if hp.shuffle_bn:
        forward = all_to_all_shuffled_forward if hp.shuffle_mode == "all_to_all" else shuffled_forward
        k, stats = forward(encode, x_k, perm, hp.axis_name)
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
      The new state and metrics averaged over the global batch.
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
        losses, ranks, batch_stats = [], [], state.batch_stats
        for (x_query, _), k in zip(pairs, keys):
            q, batch_stats = _encode(state.apply_fn, params, batch_stats, x_query)
            loss, rank = info_nce(q, k, state.queue, hp.temperature, hp.axis_name)
            losses.append(loss.mean())
            ranks.append(rank)
        return sum(losses), (batch_stats, jnp.concatenate(ranks))

    (loss, (batch_stats, rank)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
    return state, lax.pmean(metrics, hp.axis_name)
