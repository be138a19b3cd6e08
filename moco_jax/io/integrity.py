"""Checking a workdir's checkpoints again: every checkpoint's verdict
(`inspect`), and bringing back checkpoints set aside by a false alarm
(`bring_back`); `python -m moco_jax.checkpoints` runs both.

What is verified is what a restore verifies (`checkpoint.read_verified`:
the checksums of `digests.py`, finite values); a checkpoint that fails it on
a relaunch is set aside as `<step>.corrupt` (`workdirs.move_aside`). Both
functions here read only, but `bring_back` renames.
"""

from __future__ import annotations

import os
import tempfile

import orbax.checkpoint as ocp

from moco_jax.core.errors import NotFoundError
from moco_jax.io import checkpoint
from moco_jax.io.digests import DamagedCheckpointError
from moco_jax.io.orbax_logs import quiet_orbax
from moco_jax.io.workdirs import SET_ASIDE, checkpoint_dir


def _step_of(name: str) -> int | None:
    step = name.split(SET_ASIDE)[0]
    return int(step) if step.isdigit() else None


def _verdict(directory: str, step: int) -> str:
    """"ok" or why checkpoint `step` in `directory` does not verify (reads only)."""
    with quiet_orbax():
        manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                        options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        with quiet_orbax():
            checkpoint.read_verified(manager, step)
        return "ok"
    except DamagedCheckpointError as e:
        return f"damaged: {e}"
    finally:
        manager.close()


def inspect(workdir: str) -> list[tuple[str, str]]:
    """(folder name, verdict) of every checkpoint in `workdir`, set-aside
    ones included, newest first; reads only."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise NotFoundError(f"{workdir} has no checkpoints/ folder: not a pretraining or linear-probe workdir")
    names = sorted((n for n in os.listdir(directory) if _step_of(n) is not None), key=lambda n: (-_step_of(n), n))
    rows = []
    for name in names:
        if name.isdigit():
            rows.append((name, _verdict(directory, int(name))))
            continue
        with tempfile.TemporaryDirectory(prefix="moco_jax_inspect-") as view:  # a step folder orbax can list (a link)
            os.symlink(os.path.join(directory, name), os.path.join(view, str(_step_of(name))))
            rows.append((name, "set aside; " + _verdict(view, _step_of(name))))
    return rows


def bring_back(workdir: str) -> list[tuple[str, str]]:
    """Return every set-aside checkpoint of `workdir` that verifies now to its
    step folder (a false alarm: a disk that was briefly unreadable, or an older
    moco_jax's verdict); leave the others. The caller holds the workdir's lock.
    Returns (folder name, what happened) for each set-aside folder."""
    directory, done = checkpoint_dir(workdir), []
    for name, verdict in inspect(workdir):
        if name.isdigit():
            continue
        step = str(_step_of(name))
        if not verdict.endswith("; ok"):
            done.append((name, f"left as it is ({verdict.split('; ', 1)[1]})"))
        elif os.path.exists(os.path.join(directory, step)):
            done.append((name, f"verifies, but checkpoint {step} exists: left as it is"))
        else:
            os.replace(os.path.join(directory, name), os.path.join(directory, step))
            done.append((name, f"verifies: brought back as checkpoint {step}"))
    return done
