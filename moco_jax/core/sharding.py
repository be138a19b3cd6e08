"""Moving pytrees between the host and the `jax.pmap` device axis.

`jax.pmap` now runs as `jit` + `shard_map` over a one-axis mesh; its inputs
and outputs are arrays sharded over that mesh. Putting data there with the
same mesh (same devices, same order, axis name `batch`) as the step's pmap
avoids a reshard, and a recompilation, on the first call.

With several processes (multi-host), the pmap axis spans the devices of all
processes, process by process. The arrays built here are then global
`jax.Array`s of leading dimension `jax.device_count()`, of which each process
holds (and provides the data of) the rows of its own local devices; the
pmap-ed step accepts them as they are. (What a multi-process pmap returns is
each process's local part, (n_local_devices, ...): `unreplicate` and
`gather_sharded` read both kinds.) With one process everything is a single
`device_put`, as before.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

AXIS = "batch"


def pmap_devices() -> tuple[jax.Device, ...]:
    """Every device of every process in the order of the pmap axis: process
    by process, each process's local devices in order (as `jax.pmap` lays it
    out), so device i of the axis holds row i of a global array."""
    return tuple(d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p))


@functools.lru_cache(maxsize=None)
def _pmap_sharding(devices: tuple[jax.Device, ...]) -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def _axis_devices(devices: Sequence[jax.Device] | None) -> tuple[jax.Device, ...]:
    return pmap_devices() if devices is None else tuple(devices)


def _check_leading_dim(tree: Any, n: int, what: str) -> None:
    for leaf in jax.tree.leaves(tree):
        if np.shape(leaf)[:1] != (n,):
            raise ValueError(f"leading dimension of shape {np.shape(leaf)} must equal the {n} {what}")


def shard(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """This process's host arrays (n_local_devices, ...) -> arrays on the pmap
    axis, slice i on this process's i-th device.

    One process: one device_put. Several: global arrays (n_devices, ...), each
    process contributing its own slices (e.g. its share of a global batch).
    `devices`: an explicit device list for the axis (single-process use).
    """
    sharding = _pmap_sharding(_axis_devices(devices))
    local = [d for d in sharding.mesh.devices.flat if d.process_index == jax.process_index()]
    _check_leading_dim(tree, len(local), "local devices")
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_global(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Host arrays laid out over the whole axis, (n_devices, ...), identical on
    every process -> arrays on the pmap axis, row i on device i of the axis.
    Each process transfers only its own devices' rows."""
    sharding = _pmap_sharding(_axis_devices(devices))
    _check_leading_dim(tree, sharding.mesh.size, "devices of the pmap axis")
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def shard_rows(x: np.ndarray, devices: Sequence[jax.Device] | None = None) -> jax.Array:
    """A host array (N, ...) split over the axis's devices (one process's):
    (n, ceil(N / n), ...), device i holding the i-th run of rows, the last
    one padded with zeros. Only each device's rows are copied, never the
    whole array."""
    sharding = _pmap_sharding(_axis_devices(devices))
    n = sharding.mesh.size
    rows = -(-len(x) // n)

    def device_rows(index):
        i = index[0].start or 0
        part = x[i * rows:(i + 1) * rows]
        return np.pad(part, [(0, rows - len(part))] + [(0, 0)] * (x.ndim - 1))[None]

    return jax.make_array_from_callback((n, rows) + x.shape[1:], sharding, device_rows)


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """A copy of every leaf on every device of the axis: (n_devices, ...)."""
    n = len(_axis_devices(devices))
    return shard_global(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree), devices)


def unreplicate(tree: Any) -> Any:
    """One device's copy of a replicated tree, as numpy arrays.

    Reads one addressable shard instead of indexing `x[0]`, which would launch
    a slicing computation for every leaf (and, on a global multi-process
    array, need data from another process).
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's part of a pmap output (n_devices, b, ...) as one host
    array (n_local_devices * b, ...), its devices in axis order; nothing is
    read from another process."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards]).reshape((-1,) + x.shape[2:])


def gather_sharded(x: jax.Array) -> np.ndarray:
    """A sharded (n_devices, rows, ...) array as one host array (n_devices *
    rows, ...), on every process. With several processes this is a collective
    (every process must call it); it accepts a global array as well as the
    process-local part a multi-process pmap returns."""
    if jax.process_count() == 1:
        x = np.asarray(jax.device_get(x))
    else:
        from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-process only

        x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x.reshape((-1,) + x.shape[2:])


def any_process_each(flags: Sequence[bool]) -> list[bool]:
    """For each flag, whether it holds on any process (all processes call
    this together, with as many flags); one process: `flags` as they are."""
    if jax.process_count() == 1:
        return [bool(f) for f in flags]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.bool_)))
    return [bool(f) for f in gathered.reshape(-1, len(flags)).any(axis=0)]


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (all processes call this together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
