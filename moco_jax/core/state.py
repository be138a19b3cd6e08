"""The MoCo training state: one pytree with both encoders and the queue."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from moco_jax.core import sharding
from moco_jax.core.errors import ConfigError
from moco_jax.core.models import momentum_subset


class MoCoState(train_state.TrainState):
    """Everything a MoCo step reads and writes.

    Inherited: `step`, `params` (query encoder + head), `opt_state`, and the
    static `apply_fn` / `tx`.

    Attributes:
      momentum_params: the key encoder's parameters, an exponential moving
        average of `params`; never touched by the optimizer.
      batch_stats: BN running statistics of the query encoder.
      momentum_batch_stats: BN running statistics of the key encoder. They are
        *not* averaged from the query encoder's: the key encoder runs BN in
        train mode on its own (shuffled) batches and keeps its own statistics.
      queue: the negatives. Globally (K, embed_dim) unit vectors; inside the
        pmap-ed step each device holds its shard of K / n_devices rows.
        None for MoCo v3 (queue_size=0), which has no queue.
      queue_ptr: int32 row in the local shard where the next keys are written
        (None without a queue).
      rng: raw uint32 PRNG key data (2,), identical on every device. The
        shuffle-BN permutation is drawn from it, so every device draws the
        same one. (Raw data rather than a typed key: it replicates and
        checkpoints like any other array.)
    """

    momentum_params: Any = None
    batch_stats: Any = None
    momentum_batch_stats: Any = None
    queue: jax.Array | None = None
    queue_ptr: jax.Array | None = None
    rng: jax.Array | None = None
    probe: Any = None  # the online linear probe's {"params", "opt_state"} (methods/online_probe.py), None when off


def random_unit_queue(rng: jax.Array, queue_size: int, embed_dim: int) -> jax.Array:
    """(K, C) random directions, as the reference's `normalize(randn(C, K))`."""
    q = jax.random.normal(rng, (queue_size, embed_dim), jnp.float32)
    return q / jnp.linalg.norm(q, axis=1, keepdims=True)


def create_train_state(
    rng: jax.Array,
    encoder,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, int, int],
    queue_size: int,
    embed_dim: int,
) -> MoCoState:
    """A fresh, unreplicated state. The key encoder is an exact copy of the
    query encoder (MoCo v3: of its backbone and projector, not the
    predictor), parameters and BN statistics alike. `queue_size` 0: no queue
    (MoCo v3)."""
    init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    # `query` runs every part of the encoder (v3: the predictor too), so all get parameters.
    method = "query" if hasattr(encoder, "query") else None  # (any module with the encoder's call works)
    init = lambda r: encoder.init(r, jnp.zeros((2,) + tuple(image_shape)), train=False, method=method)  # noqa: E731
    variables = jax.jit(init)(init_rng)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    copy = lambda tree: jax.tree.map(jnp.array, momentum_subset(tree))  # noqa: E731 - distinct buffers
    return MoCoState.create(
        apply_fn=encoder.apply,
        params=params,
        tx=tx,
        momentum_params=copy(params),
        batch_stats=batch_stats,
        momentum_batch_stats=copy(batch_stats),
        queue=random_unit_queue(queue_rng, queue_size, embed_dim) if queue_size else None,
        queue_ptr=jnp.zeros((), jnp.int32) if queue_size else None,
        rng=jax.random.key_data(state_rng),
    )


def to_devices(state: MoCoState, devices=None) -> MoCoState:
    """Replicate the state over every device of the pmap axis (all processes'
    devices with several processes), except the queue, which is split into
    n contiguous shards of K / n rows, shard i on device i of the axis.

    Every process passes the same host state; each transfers only the rows of
    its own devices."""
    n = len(sharding.pmap_devices() if devices is None else devices)
    if state.queue is None:
        return sharding.replicate(state, devices)
    queue = np.asarray(state.queue)
    if queue.shape[0] % n:
        raise ConfigError(f"queue_size={queue.shape[0]} must be a multiple of the {n} devices")
    replicated = sharding.replicate(state.replace(queue=None), devices)
    return replicated.replace(queue=sharding.shard_global(queue.reshape((n, -1) + queue.shape[1:]), devices))


def from_devices(state: MoCoState) -> MoCoState:
    """The inverse of `to_devices`: one host copy, the queue re-assembled
    (K, C) from the shards of all devices. With several processes every
    process gets the whole queue (a collective: all must call it), so any
    of them can checkpoint it."""
    if state.queue is None:
        return sharding.unreplicate(state)
    queue = sharding.gather_sharded(state.queue)
    return sharding.unreplicate(state.replace(queue=None)).replace(queue=queue)


def queue_in_fifo_order(queue: np.ndarray, ptr: int, num_shards: int, rows_per_write: int) -> np.ndarray:
    """The (K, C) queue laid out for `num_shards` devices, re-ordered oldest first.

    Device d holds rows [d*S, (d+1)*S) (S = K / num_shards) and writes its
    `rows_per_write` keys at `ptr`. One enqueue of the global batch fills
    the same slot of every shard, so the oldest batch sits at `ptr` of every
    shard, the next at `ptr + rows_per_write`, and so on around the shard.
    """
    shards = queue.reshape(num_shards, -1, queue.shape[-1])
    size = shards.shape[1]
    slots = [(ptr + j * rows_per_write) % size for j in range(size // rows_per_write)]
    return np.concatenate([shards[:, s : s + rows_per_write].reshape(-1, queue.shape[-1]) for s in slots])


def reshard_queue(
    queue: np.ndarray, ptr: int, old_shards: int, new_shards: int, global_batch: int,
    old_global_batch: int | None = None,
) -> tuple[np.ndarray, int]:
    """The queue written on `old_shards` devices (with `old_global_batch`,
    default the same), laid out for `new_shards` devices and `global_batch`.

    Same layout: unchanged (bit-exact resume). Otherwise the keys keep their
    age order, so the oldest keys are still the next to be replaced.
    """
    old_global_batch = old_global_batch or global_batch
    if (old_shards, old_global_batch) == (new_shards, global_batch):
        return queue, ptr
    k = queue.shape[0]
    if k % global_batch or global_batch % new_shards:
        raise ValueError(
            f"cannot resume: queue_size={k} must be a multiple of batch_size={global_batch}, "
            f"which must be a multiple of the {new_shards} devices"
        )
    fifo = queue_in_fifo_order(queue, ptr, old_shards, old_global_batch // old_shards)
    batches = fifo.reshape(k // global_batch, new_shards, global_batch // new_shards, -1)
    return batches.transpose(1, 0, 2, 3).reshape(queue.shape), 0
