"""Saving during a run: asynchronous checkpoints, each checked as soon as
orbax has written it.

A save that fails in orbax's background threads (no space left, a
read-only or vanished folder, a path orbax cannot read back) would otherwise
be noticed a whole checkpoint interval later, at the next save, with pages
of orbax traceback, and exiting could then wait minutes on orbax's threads.
`CheckpointWriter` instead looks after every step whether the save in flight
has finished; once it has, it confirms that the checkpoint was committed and
reads it back (process 0), comparing every array with the checksums it was
saved with. A failure becomes one `StorageError` naming the checkpoint's
path and the cause, and orbax's own error records are kept off the console
(`--verbose` shows them).

    writer = CheckpointWriter(workdir, keep)
    writer.save(host_state, config, **meta)  # checks the previous save first
    failure = writer.poll()                  # after every step: None, or the StorageError
    writer.finish()                          # waits for, checks and closes
"""

from __future__ import annotations

import logging as logging_lib
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from moco_jax.io import checkpoint, storage, workdirs
from moco_jax.io.digests import DamagedCheckpointError
from moco_jax.io.orbax_logs import quiet_orbax
from moco_jax.io.storage import StorageError

ENV_VERBOSE = "MOCO_JAX_VERBOSE"


class _OrbaxErrors(logging_lib.Filter):
    """Keeps the first exception orbax logs (its background threads log a
    failed write rather than raise it) and drops orbax's error records from
    the console, unless $MOCO_JAX_VERBOSE is set."""

    def __init__(self):
        super().__init__()
        self.first: BaseException | None = None

    def filter(self, record: logging_lib.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname or record.levelno < logging_lib.ERROR:
            return True
        if self.first is None and record.exc_info and record.exc_info[1] is not None:
            self.first = record.exc_info[1]
        return os.environ.get(ENV_VERBOSE, "").lower() in ("1", "true", "yes")


def _reader(directory: str) -> ocp.CheckpointManager:
    """A read-only manager that only this process uses (no barrier with the
    others), for reading back what was just written."""
    return ocp.CheckpointManager(
        directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(
            create=False, read_only=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=jax.process_index(), active_processes={jax.process_index()})))


class CheckpointWriter:
    """The checkpoints of one run (see the module docstring)."""

    def __init__(self, workdir: str, max_to_keep: int = 3):
        self.directory = workdirs.checkpoint_dir(workdir)
        self.manager = checkpoint.make_manager(workdir, max_to_keep)
        self.failure: StorageError | None = None
        self.last_verified: int | None = None
        self._pending: int | None = None  # the step of the save in flight, not yet checked
        self._errors = _OrbaxErrors()
        logging_lib.getLogger("absl").addFilter(self._errors)

    def save(self, host_state: Any, config, **meta) -> None:
        """Check the previous save (waiting for it), then start saving `host_state`."""
        self._raise_if_failed(self.poll(wait=True))
        step = int(host_state.step)
        try:
            checkpoint.save(self.manager, host_state, config, **meta)
        except Exception as e:  # noqa: BLE001 - whatever orbax raises, this save failed
            self._raise_if_failed(self._fail(step, e))
        self._pending = step

    def poll(self, wait: bool = False) -> StorageError | None:
        """The failure of the save in flight once it has finished (None while
        it is still being written, unless `wait`, and when it is good)."""
        if self.failure is not None or self._pending is None:
            return self.failure
        if not wait and self.manager.is_saving_in_progress():
            return None
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            return self._fail(step, e)
        if not os.path.isdir(os.path.join(self.directory, str(step))):
            return self._fail(step, self._errors.first or RuntimeError("orbax did not commit it"))
        workdirs.note_written(self.manager)
        if jax.process_index() == 0:
            with quiet_orbax():  # its notices about a read-only manager
                reader = _reader(self.directory)
            try:
                checkpoint.read_verified(reader, step)
            except DamagedCheckpointError as e:
                return self._fail(step, e, written=True)
            finally:
                reader.close()
        self.last_verified = step
        return None

    def finish(self) -> None:
        """Wait for the save in flight, check it and close. After a failure
        orbax's threads may wait minutes for a save that will never finish:
        the manager is then left as it is."""
        failure = self.poll(wait=True)
        logging_lib.getLogger("absl").removeFilter(self._errors)
        if failure is None:
            self.manager.close()
        self._raise_if_failed(failure)

    def _fail(self, step: int, error: BaseException, written: bool = False) -> StorageError:
        path = os.path.join(self.directory, str(step))
        last = (f"the last verified checkpoint is {self.last_verified}" if self.last_verified is not None
                else "no checkpoint of this run was verified")
        if written:
            what = f"checkpoint {step} was written to {path} but does not read back as saved ({error})"
        else:
            cause = storage.storage_cause(self._errors.first or error)
            what = f"checkpoint {step} could not be written to {path}: {cause}"
        self.failure = StorageError(f"{what}; training stopped ({last}). Fix the storage, then relaunch the same "
                                    "command to resume")
        return self.failure

    @staticmethod
    def _raise_if_failed(failure: StorageError | None) -> None:
        if failure is not None:
            raise failure
