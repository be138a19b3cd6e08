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

Integrity. Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a process killed mid-save leaves no checkpoint
that looks finished. Damage after that (a truncated or bit-flipped file, a
deleted metadata file, a bad disk) is caught because `meta` also holds
checksums: BLAKE2b of every saved array (its dtype, shape and bytes, as the
host had it before the save) and of the rest of `meta`. Restore recomputes
them from what it read, so what is verified is the values the run continues
with, whatever orbax and tensorstore do in between. A checkpoint that fails
(or holds non-finite values) is set aside as `<step>.corrupt` with one
warning line, and the previous one is tried.

Never silently starting over: a relaunch that finds no usable checkpoint in
a workdir that has held some refuses until it is given `fresh_start`.

Elsewhere in `io`: the checksums are `digests.py`; where a workdir's
checkpoints are, the set-aside ones, the history of written checkpoints and
the fresh start are `workdirs.py`; inspecting a workdir's checkpoints and
bringing back those set aside by a false alarm is `integrity.py`; keeping
orbax's log records off the console is `orbax_logs.py`. The queue's layout
for another device count is `core/state.py` (`reshard_queue`).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from moco_jax import methods
from moco_jax.core import models
from moco_jax.core.config import flatten_dotted
from moco_jax.core.errors import ConfigError, NotFoundError, PathError, WorkdirError
from moco_jax.core.sharding import any_process
from moco_jax.core.state import MoCoState, reshard_queue
from moco_jax.io import digests, old_configs, storage
from moco_jax.io.digests import DamagedCheckpointError
from moco_jax.io.orbax_logs import quiet_orbax
from moco_jax.io.workdirs import (RUN_FILES, checkpoint_dir, has_held_checkpoints, move_aside, note_written,
                                  set_aside_checkpoints, start_fresh)

# Config fields that fix the shapes of the saved arrays: a checkpoint written
# with other values cannot be restored into this model. (model.dtype, sync_bn
# or bn_momentum may change on resume: they change no saved shape.)
MODEL_FIELDS = models.SHAPE_FIELDS + methods.SHAPE_FIELDS + ("optimizer",)  # (the optimizer: its state's shapes)


class CheckpointMismatchError(ConfigError):
    """The checkpoint in the workdir was written with a config whose saved
    shapes differ from this one's."""


def check_writable(workdir: str) -> None:
    """Fail at start-up, not at the first save, if `workdir` or its
    checkpoint folder (which may be a link to other storage) is unusable:
    not writable, or a path orbax cannot write or read back
    (`storage.check_checkpoint_path`)."""
    directory = checkpoint_dir(workdir)
    try:
        os.makedirs(directory, exist_ok=True)
        for folder in (workdir, directory):
            # Unique per launch: two launches racing for one workdir (the lock
            # decides which trains) must not delete each other's probe.
            probe = os.path.join(folder, f".write_probe_{socket.gethostname()}_{os.getpid()}_{jax.process_index()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
    except OSError as e:
        raise PathError(f"workdir {workdir!r} is not writable ({storage.storage_cause(e)}: {e}); pass a --workdir "
                        "this process can write to") from e
    storage.check_checkpoint_path(directory)


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """An orbax manager that saves in the background and keeps the last few."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "meta"))


# ---------------------------------------------------------------------------
# Save and restore.
# ---------------------------------------------------------------------------
def save(manager: ocp.CheckpointManager, host_state: Any, config, **meta) -> None:
    """Start an asynchronous save of a host state (a flax struct, e.g. from
    `state.from_devices`), with the config, its step, `meta` and the
    checksums of both as JSON. Waits for the previous save first.
    (`CheckpointWriter` adds the check of each save once it is written.)"""
    manager.wait_until_finished()
    note_written(manager)
    step = int(host_state.step)
    state_dict = jax.tree.map(np.asarray, serialization.to_state_dict(host_state))
    meta = digests.with_checksums(_json_roundtrip({"config": config.to_dict(), "step": step, **meta}), state_dict)
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(meta)),
    )


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the save in flight (a good save is completed, even when the
    run stops on an error), record it, and close the manager."""
    try:
        manager.wait_until_finished()
        note_written(manager)
    finally:
        manager.close()


def _json_roundtrip(tree: dict) -> dict:
    """`tree` as it reads back from JSON (tuples become lists), so that its
    digest is the same before the save and after the restore."""
    return json.loads(json.dumps(tree))


def _reason(error: Exception) -> str:
    """An exception as a short one-line reason (orbax's can run to pages)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def check_compatible(saved: dict, config, fields: tuple[str, ...] = MODEL_FIELDS) -> None:
    """Raise CheckpointMismatchError naming every one of `fields` that differs."""
    saved, current = (flatten_dotted(old_configs.upgraded(ml_collections.ConfigDict(c)).to_dict())
                      for c in (saved, config.to_dict()))
    diffs = [f"{name}: checkpoint {saved.get(name)!r} != config {current.get(name)!r}"
             for name in fields if saved.get(name) != current.get(name)]
    if diffs:
        raise CheckpointMismatchError(
            "the checkpoint was written with a different config; mismatching fields: " + "; ".join(diffs)
            + ". Use a new --workdir, or the config the checkpoint was trained with."
        )


class NoUsableCheckpointError(WorkdirError):
    """The workdir has held checkpoints, and none of them is usable now."""


def read_verified(manager: ocp.CheckpointManager, step: int, config=None,
                  fields: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Checkpoint `step` as (state dict, meta), verified against its
    checksums (DamagedCheckpointError if it fails). With `config`, it must
    agree on `fields` (CheckpointMismatchError).

    The arrays are read as saved, into host memory, without a target to cast
    them to (a fresh state's Python-int step would make the step int64), so
    that the checksums compare exactly what was written."""
    try:
        with quiet_orbax():
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - whatever orbax raises, the checkpoint is unusable
        raise DamagedCheckpointError(f"its metadata cannot be read: {_reason(e)}") from None
    digests.verify_meta(meta)
    if config is not None:
        check_compatible(meta["config"], config, fields)
    try:
        with quiet_orbax():
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    except Exception as e:  # noqa: BLE001
        raise DamagedCheckpointError(f"its arrays cannot be read: {_reason(e)}") from None
    restored = jax.tree.map(np.asarray, restored)
    ignored = digests.verify_arrays(restored, meta)
    if ignored:
        logging.warning("checkpoint %d in %s was written by moco_jax 0.2, whose checksums of the absent %s are not "
                        "the same in every process: they are ignored (every array is verified)", step,
                        os.path.dirname(str(manager.directory)), " and ".join(ignored))
    return restored, meta


def _data_shapes(tree: Any) -> dict[str, tuple]:
    return {p: np.shape(v) for p, v in digests.flat_leaves(tree).items() if not digests.has_no_data(v)}


def fit_differences(template: Any, restored: dict) -> list[str]:
    """How a verified checkpoint's arrays differ from those of `template`
    (a state of the current config): arrays only one of them has, or of
    another shape. [] when it fits."""
    want, got = _data_shapes(serialization.to_state_dict(template)), _data_shapes(restored)
    extra, missing = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
    reshaped = sorted(p for p in want.keys() & got.keys() if want[p] != got[p])
    return ([f"{len(extra)} arrays only in the checkpoint (first: {extra[0]})"] if extra else []) + (
        [f"{len(missing)} arrays it lacks (first: {missing[0]})"] if missing else []) + (
        [f"{len(reshaped)} arrays of another shape (first: {reshaped[0]}, {got[reshaped[0]]} in the checkpoint, "
         f"{want[reshaped[0]]} now)"] if reshaped else [])


def _fit(template: Any, restored: dict, meta: dict, config, where: str) -> Any:
    """`restored` as a state like `template`, or CheckpointMismatchError
    (nothing is moved: the checkpoint is intact, the config is not its).
    A field the state gained since the checkpoint was written (e.g. `probe`,
    the online probe's) is taken as absent when the template has none."""
    empty = {k for k, v in serialization.to_state_dict(template).items() if v is None}
    restored = {**{k: None for k in empty - restored.keys()}, **restored}
    differences = fit_differences(template, restored)
    if not differences:
        try:
            return serialization.from_state_dict(template, restored)
        except (KeyError, ValueError, TypeError) as e:
            differences = [_reason(e)]
    changes = config_changes(meta["config"], config) if config is not None else []
    changed = ("; config fields changed since it was written: " + "; ".join(changes[:6])
               + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")) if changes else ""
    raise CheckpointMismatchError(
        f"checkpoint {meta['step']} in {where} is intact but does not fit this config's training state "
        f"({'; '.join(differences)}){changed}. Nothing was moved: relaunch with the config it was written with, "
        "or use a new --workdir")


def _newest_usable(workdir: str, template: Any, config, fields: tuple[str, ...]) -> tuple[Any, dict] | None:
    """The newest checkpoint that passes `read_verified` and fits
    `template`, setting aside those whose bytes fail verification."""
    manager = make_manager(workdir)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored, meta = read_verified(manager, step, config, fields)
                damage = None
            except DamagedCheckpointError as e:
                damage = str(e)
            if any_process(damage is not None):
                name = move_aside(manager, step)
                logging.warning("checkpoint %d in %s is damaged (%s); set aside as %s, trying the previous one",
                                step, workdir, damage or "on another process", name)
                continue
            state = _fit(template, restored, meta, config, workdir)
            logging.info("resumed from checkpoint %d in %s", step, workdir)
            return state, meta
    finally:
        manager.close()
    return None


def config_changes(saved: dict, config) -> list[str]:
    """"field: saved -> now" for every field whose value differs from the
    checkpoint's config (after a JSON round trip, as it was saved) and that
    `config`'s method reads (another method's field, e.g. MoCo v2's
    shuffle_mode in a MoCo v3 run, changes nothing); a field added since it
    was written counts as its `old_configs` default."""
    saved, current = flatten_dotted(saved), flatten_dotted(_json_roundtrip(config.to_dict()))
    saved.update({k: v for k, v in old_configs.FIELD_DEFAULTS.items() if k in current and k not in saved})
    method = methods.get(config) if "method" in config else None  # (a linear probe's config has none)
    return [f"{name}: {saved.get(name)!r} -> {current.get(name)!r}" for name in sorted(saved.keys() | current.keys())
            if saved.get(name) != current.get(name) and methods.reader_of(name) in (None, method)]


def _log_config_changes(meta: dict, config) -> None:
    changes = config_changes(meta["config"], config)
    if changes:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        logging.warning("resuming checkpoint %d with a changed config: %s", meta["step"], shown)


def restore_newest(workdir: str, template: Any, config, fields: tuple[str, ...],
                   fresh_start: bool = False) -> tuple[Any, dict] | None:
    """The newest usable checkpoint in `workdir` as (host state, meta), or
    None for a workdir that never held one.

    The checkpoint's config must agree with `config` on `fields` (those that
    fix the saved shapes), else CheckpointMismatchError. A damaged checkpoint
    is moved aside to `<step>.corrupt` with a one-line warning and the next
    older one is tried. If the workdir has held checkpoints and none is
    usable: NoUsableCheckpointError, unless `fresh_start`, which moves the
    remains aside (`start_fresh`) and returns None.
    """
    with quiet_orbax():  # the one warning below says what orbax would say at length
        newest = _newest_usable(workdir, template, config, fields)
    if newest is not None:
        _log_config_changes(newest[1], config)
        return newest
    if not has_held_checkpoints(workdir):
        return None
    set_aside = set_aside_checkpoints(workdir)
    if fresh_start:
        target = start_fresh(workdir, also_move=RUN_FILES)
        logging.warning("fresh start: no usable checkpoint in %s; what the earlier run left is now in %s",
                        workdir, target)
        return None
    raise NoUsableCheckpointError(
        f"workdir {workdir} has held checkpoints but none is usable now (set aside in "
        f"{checkpoint_dir(workdir)}: {', '.join(set_aside) or 'none'}); if that was a false alarm, "
        f"`python -m moco_jax.checkpoints --workdir {workdir} --bring_back` returns those that verify now; relaunch "
        "with --fresh_start to start again from step 0 (the earlier files are kept in a replaced-<time>/ folder), "
        "or use another --workdir"
    )


def resume(workdir: str, template: MoCoState, config, num_shards: int, fresh_start: bool = False,
           data_pipeline: str = "") -> tuple[MoCoState, dict] | None:
    """The newest usable pretraining checkpoint in `workdir` as (host state,
    meta), or None (see `restore_newest`). The queue is re-laid out for
    `num_shards` devices and this config's batch if it was written with others.
    `data_pipeline` (what reads the images now, e.g. 'grain') is compared with
    the one that wrote the checkpoint: a change is logged, since it changes
    the data order from there on."""
    newest = restore_newest(workdir, template, config, MODEL_FIELDS, fresh_start)
    if newest is None:
        return None
    restored, meta = newest
    saved_pipeline = meta.get("data_pipeline", "")
    if data_pipeline and saved_pipeline and saved_pipeline != data_pipeline:
        logging.warning(
            "checkpoint %d was written reading the images through %s, this run reads them through %s: from "
            "here on each step's crops differ from what the original run would have read (for tensorflow-datasets "
            "also its images, so within this epoch some may repeat or be left out); --config.data_loader keeps one",
            meta["step"], saved_pipeline, data_pipeline)
    if restored.queue is None:  # MoCo v3: nothing depends on the device count
        return restored, meta
    queue, ptr = reshard_queue(
        np.asarray(restored.queue), int(restored.queue_ptr), meta["num_queue_shards"], num_shards,
        config.batch_size, meta["config"]["batch_size"],
    )
    return restored.replace(queue=queue, queue_ptr=np.asarray(ptr, np.int32)), meta


def restore_latest(workdir: str, template: MoCoState, config, num_shards: int,
                   fresh_start: bool = False, data_pipeline: str = "") -> MoCoState | None:
    """The state of `resume`, or None."""
    resumed = resume(workdir, template, config, num_shards, fresh_start, data_pipeline)
    return resumed[0] if resumed else None


def load_encoder_variables(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The query encoder of the newest usable checkpoint in a pretraining workdir.

    Returns (config, {"params", "batch_stats"}) for `methods.build_encoder(config)`:
    backbone and head, as downstream evaluation and export need them. Reads
    only: a damaged checkpoint is skipped with a warning, not moved.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise NotFoundError(f"{workdir} is not a pretraining workdir (it has no checkpoints/ folder); pass the "
                            "--workdir of a train.py run, or an exported .msgpack / .safetensors / .pth.tar file")
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored, meta = read_verified(manager, step)
            except DamagedCheckpointError as e:
                logging.warning("checkpoint %d in %s is damaged (%s); trying the previous one", step, workdir, e)
                continue
            config = old_configs.upgraded(ml_collections.ConfigDict(meta["config"]))
            return config, {"params": restored["params"], "batch_stats": restored["batch_stats"]}
    finally:
        manager.close()
    raise NotFoundError(f"no usable checkpoint in {directory}")
