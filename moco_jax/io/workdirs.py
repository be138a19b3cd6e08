"""What a workdir holds around its checkpoints: where they are, which were
set aside as damaged, and the record that checkpoints were ever written.

    <workdir>/checkpoints/<step>/           a checkpoint (`checkpoint.py`)
    <workdir>/checkpoints/<step>.corrupt    one set aside as damaged (`move_aside`)
    <workdir>/checkpoint_history.json       checkpoints have been written here (`note_written`)
    <workdir>/replaced-<time>/              what a fresh start moved out of the way (`start_fresh`)

Never silently starting over. Once a checkpoint of a workdir has been
written, `checkpoint_history.json` records it. A relaunch that then finds no
usable checkpoint refuses, every time, until it is given `fresh_start`
(`train.py --fresh_start`); that moves what the earlier run left (the
set-aside checkpoints, the history, the metrics) to `replaced-<time>/` in the
workdir and starts at step 0. Nothing is deleted.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

HISTORY_NAME = "checkpoint_history.json"  # in the workdir: checkpoints have been written here
SET_ASIDE = ".corrupt"  # suffix of a damaged checkpoint's directory
REPLACED_PREFIX = "replaced-"  # a fresh start moves the earlier run's files to <workdir>/replaced-<time>/
# What else a fresh start moves out of the way: the earlier run's metrics and
# TensorBoard events (else its curves and the new run's would interleave).
RUN_FILES = ("metrics.jsonl", "final_metrics.json", "knn_random.json", "events.out.tfevents.*")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.realpath(workdir), "checkpoints")


def note_written(manager: ocp.CheckpointManager) -> None:
    """Record in the workdir that it holds finished checkpoints (process 0)."""
    steps = manager.all_steps()
    if not steps or jax.process_index() != 0:
        return
    path = os.path.join(os.path.dirname(str(manager.directory)), HISTORY_NAME)
    record = {"checkpoints": sorted(int(s) for s in steps), "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime())}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def set_aside_checkpoints(workdir: str) -> list[str]:
    """The damaged checkpoints moved aside in `workdir` (directory names)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(d for d in os.listdir(directory) if SET_ASIDE in d)


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Set checkpoint `step` aside: rename it to `<step>.corrupt` (or
    `<step>.corrupt1`, ... if that exists; process 0 renames). Returns the
    new folder name."""
    path = os.path.join(str(manager.directory), str(step))
    target, n = f"{path}{SET_ASIDE}", 1
    while os.path.exists(target):  # the same step may go bad twice
        target, n = f"{path}{SET_ASIDE}{n}", n + 1
    if jax.process_index() == 0 and os.path.isdir(path):
        os.replace(path, target)
    return os.path.basename(target)


def has_held_checkpoints(workdir: str) -> bool:
    """Whether checkpoints were ever written to `workdir` by this library."""
    return os.path.exists(os.path.join(workdir, HISTORY_NAME)) or bool(set_aside_checkpoints(workdir))


def start_fresh(workdir: str, also_move: tuple[str, ...] = ()) -> str:
    """Move what an earlier run left in `workdir` (set-aside checkpoints, the
    checkpoint history and the files matching `also_move`, e.g. metrics) to
    `<workdir>/replaced-<UTC time>/`; returns that directory (process 0 moves)."""
    target = os.path.join(workdir, REPLACED_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    if jax.process_index() == 0:
        os.makedirs(os.path.join(target, "checkpoints"), exist_ok=True)
        for name in set_aside_checkpoints(workdir):
            shutil.move(os.path.join(checkpoint_dir(workdir), name), os.path.join(target, "checkpoints", name))
        for pattern in (HISTORY_NAME, *also_move):
            for path in glob.glob(os.path.join(glob.escape(workdir), pattern)):
                shutil.move(path, os.path.join(target, os.path.basename(path)))
    return target
