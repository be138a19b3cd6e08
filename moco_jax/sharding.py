"""Moving pytrees between the host and the `jax.pmap` device axis.

`jax.pmap` now runs as `jit` + `shard_map` over a one-axis mesh; its inputs
and outputs are arrays sharded over that mesh. Putting data there with the
same mesh axis name (`batch`) as the step's pmap axis avoids a reshard, and
a recompilation, on the first call.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

AXIS = "batch"


@functools.lru_cache(maxsize=None)
def _pmap_sharding(devices: tuple[jax.Device, ...]) -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def shard(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Host arrays (n_local_devices, ...) -> slice i on local device i, in one
    device_put (no per-device Python slicing)."""
    devices = tuple(jax.local_devices() if devices is None else devices)
    for leaf in jax.tree.leaves(tree):
        if np.shape(leaf)[:1] != (len(devices),):
            raise ValueError(f"leading dimension of shape {np.shape(leaf)} must equal the {len(devices)} devices")
    return jax.device_put(tree, _pmap_sharding(devices))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """A copy of every leaf on every local device: (n_local_devices, ...)."""
    n = len(jax.local_devices() if devices is None else devices)
    return shard(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree), devices)


def unreplicate(tree: Any) -> Any:
    """Device 0's copy of a replicated tree, as numpy arrays.

    Reads one addressable shard instead of indexing `x[0]`, which would launch
    a slicing computation for every leaf.
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def gather_sharded(x: jax.Array) -> np.ndarray:
    """A sharded (n_devices, rows, ...) array as one host array (n_devices * rows, ...)."""
    x = np.asarray(jax.device_get(x))
    return x.reshape((-1,) + x.shape[2:])
