"""Preemption-safe checkpoints (orbax-checkpoint): of the whole MoCo state
during pretraining, and of the linear probe's classifier.

A checkpoint in `<workdir>/checkpoints/<step>/` holds two items:

* `state`: a host copy of the training state. For pretraining that is
  `MoCoState` (step, both encoders' params, both sets of BN statistics,
  optimizer state, the whole (K, C) queue, its pointer and the PRNG key);
  replicated arrays are stored once, not once per device.
* `meta`: JSON with the config, the step and what else the program needs
  (pretraining: the number of queue shards, i.e. the device count), so a
  relaunch knows where it stands.

The data position is the step: the input pipelines derive every batch from
(seed, global step), so restoring the step restores the data order too.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a process killed mid-save leaves no checkpoint that looks
finished. A checkpoint that is finished but unreadable (a corrupt file) is
moved aside with a warning, and the previous one is used.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from moco_jax.core.config import flatten_dotted
from moco_jax.core.state import MoCoState

# Config fields that fix the shapes of the saved arrays: a checkpoint written
# with other values cannot be restored into this model. (model.dtype, sync_bn
# or bn_momentum may change on resume: they change no saved shape.)
MODEL_FIELDS = ("model.depth", "model.width", "model.stem", "model.head", "embed_dim", "queue_size")


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir was written with a config whose saved
    shapes differ from this one's."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def check_writable(workdir: str) -> None:
    """Fail at start-up, not at the first save, if `workdir` is unusable."""
    try:
        os.makedirs(checkpoint_dir(workdir), exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"workdir {workdir!r} is not writable ({e}); pass a --workdir this process can write to") from e


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """An orbax manager that saves in the background and keeps the last few."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "meta"))


# ---------------------------------------------------------------------------
# The queue across device counts.
# ---------------------------------------------------------------------------
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
    queue: np.ndarray, ptr: int, old_shards: int, new_shards: int, global_batch: int, old_global_batch: int | None = None
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


# ---------------------------------------------------------------------------
# Save and restore.
# ---------------------------------------------------------------------------
def save(manager: ocp.CheckpointManager, host_state: Any, config, **meta) -> None:
    """Start an asynchronous save of a host state (a flax struct, e.g. from
    `state.from_devices`), with the config, its step and `meta` as JSON."""
    step = int(host_state.step)
    state_dict = jax.tree.map(np.asarray, serialization.to_state_dict(host_state))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_dict),
            meta=ocp.args.JsonSave({"config": config.to_dict(), "step": step, **meta}),
        ),
    )


def check_compatible(saved: dict, config, fields: tuple[str, ...] = MODEL_FIELDS) -> None:
    """Raise CheckpointMismatchError naming every one of `fields` that differs."""
    saved, current = flatten_dotted(saved), flatten_dotted(config.to_dict())
    diffs = [
        f"{name}: checkpoint {saved.get(name)!r} != config {current.get(name)!r}"
        for name in fields
        if saved.get(name) != current.get(name)
    ]
    if diffs:
        raise CheckpointMismatchError(
            "the checkpoint was written with a different config; mismatching fields: " + "; ".join(diffs)
            + ". Use a new --workdir, or the config the checkpoint was trained with."
        )


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
    path = os.path.join(str(manager.directory), str(step))
    if jax.process_index() == 0 and os.path.isdir(path):
        target, n = f"{path}.corrupt", 1
        while os.path.exists(target):  # the same step may go bad twice
            target, n = f"{path}.corrupt{n}", n + 1
        os.replace(path, target)


def restore_newest(workdir: str, template: Any, config, fields: tuple[str, ...]) -> tuple[Any, dict] | None:
    """The newest readable checkpoint in `workdir` as (host state, meta), or None.

    The checkpoint's config must agree with `config` on `fields` (those that
    fix the saved shapes), else CheckpointMismatchError. Unreadable
    checkpoints are moved aside to `<step>.corrupt` with a warning and the
    next older one is tried; if none is readable, RuntimeError.
    """
    manager = make_manager(workdir)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        for step in steps:
            try:
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                logging.warning("checkpoint %d in %s is unreadable (%s); trying the previous one", step, workdir, e)
                _move_aside(manager, step)
                continue
            check_compatible(meta["config"], config, fields)
            try:
                restored = _restore_state(manager, step, template)
            except Exception as e:  # noqa: BLE001
                logging.warning("checkpoint %d in %s is corrupt (%s); trying the previous one", step, workdir, e)
                _move_aside(manager, step)
                continue
            logging.info("resumed from checkpoint %d in %s", step, workdir)
            return restored, meta
        if steps:
            # Starting over in a workdir whose every checkpoint is bad would
            # silently throw a long run away: let a person decide.
            raise RuntimeError(
                f"no checkpoint in {checkpoint_dir(workdir)} is readable (moved aside as *.corrupt: steps "
                f"{steps}); delete them or pass a new --workdir to start from scratch"
            )
        return None
    finally:
        manager.close()


def restore_latest(workdir: str, template: MoCoState, config, num_shards: int) -> MoCoState | None:
    """The newest readable pretraining checkpoint in `workdir` as a host
    state, or None (see `restore_newest`). The queue is re-laid out for
    `num_shards` devices and this config's batch if it was written with others."""
    newest = restore_newest(workdir, template, config, MODEL_FIELDS)
    if newest is None:
        return None
    restored, meta = newest
    queue, ptr = reshard_queue(
        np.asarray(restored.queue), int(restored.queue_ptr), meta["num_queue_shards"], num_shards,
        config.batch_size, meta["config"]["batch_size"],
    )
    return restored.replace(queue=queue, queue_ptr=np.asarray(ptr, np.int32))


def _restore_state(manager, step: int, template: Any) -> Any:
    target = jax.tree.map(np.asarray, serialization.to_state_dict(template))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    state = serialization.from_state_dict(template, restored)
    for leaf in jax.tree.leaves(state):
        if not np.all(np.isfinite(np.asarray(leaf, np.float64))):
            raise ValueError("non-finite values in the saved state")
    return state


def load_encoder_variables(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The query encoder of the newest checkpoint in a pretraining workdir.

    Returns (config, {"params", "batch_stats"}) for `models.build_encoder(config)`:
    backbone and head, as downstream evaluation and export need them.
    """
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state", "meta"))
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    config = ml_collections.ConfigDict(meta["config"])
    variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
    return config, jax.tree.map(np.asarray, variables)
