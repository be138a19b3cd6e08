"""Shuffle BN (MoCo v1/v2): the key encoder encodes a random mix of the
global batch, so that BN statistics cannot leak which key belongs to which
query. Two ways to move the images, the same keys either way:

* `shuffled_forward` (the reference): all-gather the global batch, encode a
  slice of a permutation every device draws from the same key;
* `all_to_all_shuffled_forward`: one all-to-all each way, n times less
  traffic, with a `stratified_permutation`.

`shuffle_mode="auto"` (the default) takes the all-to-all wherever it
applies (more than one device, a per-device batch that splits evenly over
them), else the all-gather. Both move the images in the backbone's compute
dtype (`moco_v2.MoCoHParams.image_dtype`): bfloat16 halves the bytes and
changes no key, since the backbone casts its input to it first.

Every function here runs inside `jax.pmap(..., axis_name=axis_name)`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from moco_jax.core.errors import ConfigError

SHUFFLE_MODES = ("auto", "all_gather", "all_to_all")  # config.shuffle_mode


def resolve_shuffle_mode(mode: str, local_batch: int, num_devices: int) -> str:
    """"all_gather" or "all_to_all": `mode`, with "auto" -> the all-to-all
    (n times less traffic) where it applies: n > 1 devices and a per-device
    batch that is a multiple of n."""
    if mode != "auto":
        return mode
    return "all_to_all" if num_devices > 1 and local_batch % num_devices == 0 else "all_gather"


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


def shuffle_permutation(rng: jax.Array, global_batch: int) -> jax.Array:
    """A permutation of the global batch. `rng` must be the same on every
    device (it comes from the replicated state), so all devices agree."""
    return jax.random.permutation(rng, global_batch)


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
