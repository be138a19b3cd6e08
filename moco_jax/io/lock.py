"""One run per workdir: a lock file with a heartbeat.

Two launches on one workdir (a job submitted twice, a relaunch while the
first run still trains) would both train, log every step twice and save over
each other's checkpoints. So a training run holds `<workdir>/LOCK`, a small
JSON file: host, pid, run id, start time, the command, and a heartbeat that a
background thread renews every `heartbeat_s` seconds.

A second launch finds the lock and refuses, in one line naming the holder,
unless the holder is dead:

* on the same host, its pid no longer runs (a crash, `kill -9`);
* on any host (a shared filesystem), its heartbeat is older than its lease
  (`lease_s`, written in the lock; the hosts' clocks must agree to within a
  lease, as NTP keeps them).

A stale lock is taken over with one warning. `--take_over` takes the lock
from a holder that looks alive: the holder notices at its next heartbeat and
stops without saving again, and the new run waits that long before it reads
the checkpoints.

Every change of the lock file (create, renew, take over) happens under a
short-lived mutex file created with O_EXCL, which is atomic on local
filesystems and on NFS v3+, so a takeover cannot interleave with a renewal.
In a multi-process run process 0 holds the lock and every process gets the
same verdict (`acquire_for_run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

import jax
import numpy as np
from absl import logging

from moco_jax.core.errors import WorkdirError

LOCK_NAME = "LOCK"
HEARTBEAT_S = 15.0  # how often the holder renews its heartbeat
LEASE_S = 120.0  # a heartbeat older than this means the holder is gone
_MUTEX_STALE_S = 30.0  # a mutex file this old was left by a killed process


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a workdir (the lock file's contents)."""

    host: str
    pid: int
    run_id: str
    started: float
    heartbeat: float
    lease_s: float
    command: str = ""

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (f"a run on host {self.host} (pid {self.pid}, started {started}, last heartbeat "
                f"{max(0.0, now - self.heartbeat):.0f} s ago)")


def read_holder(path: str) -> Holder | None:
    """The lock at `path`, or None if there is none or it is unreadable."""
    try:
        with open(path) as f:
            fields = json.load(f)
        return Holder(**{k: fields[k] for k in Holder.__dataclass_fields__ if k in fields})
    except (OSError, ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_reason(holder: Holder, path: str, now: float | None = None) -> str | None:
    """Why the lock of `holder` is stale, or None if it may still be held."""
    now = time.time() if now is None else now
    if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
        return f"its process {holder.pid} no longer runs on this host"
    try:
        touched = os.path.getmtime(path)
    except OSError:
        touched = holder.heartbeat
    age = now - max(holder.heartbeat, touched)
    if age > holder.lease_s:
        return f"its heartbeat is {age:.0f} s old (lease {holder.lease_s:.0f} s)"
    return None


class WorkdirLock:
    """The lock of one workdir, held by this process while training.

        lock = WorkdirLock(workdir); lock.acquire(); ...; lock.release()

    `lost` turns True when another launch took the lock over; the trainer
    then stops without saving."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, lease_s: float = LEASE_S):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self.run_id = uuid.uuid4().hex
        self.took_over_live = False
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    # -- acquire / release ---------------------------------------------------
    def acquire(self, take_over: bool = False) -> None:
        """Hold the workdir, or raise WorkdirError naming its holder."""
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(50):
            if self._create():
                self._start_heartbeat()
                return
            holder = read_holder(self.path)
            if holder is None:  # being written, or garbage: give the writer a moment
                time.sleep(0.1)
                if read_holder(self.path) is None and self._remove_if(None):
                    logging.warning("removed an unreadable lock file %s", self.path)
                continue
            reason = stale_reason(holder, self.path)
            if reason is None and not take_over:
                raise WorkdirError(
                    f"workdir {self.workdir} is in use by {holder.describe()}; wait for it to finish or stop it, "
                    f"or relaunch with --take_over to take the workdir from it (that run then stops without saving)"
                )
            if self._remove_if(holder.run_id):
                if reason is None:
                    self.took_over_live = True
                    logging.warning("taking over workdir %s from %s (--take_over)", self.workdir, holder.describe())
                else:
                    logging.warning("taking over workdir %s from %s: %s", self.workdir, holder.describe(), reason)
        raise WorkdirError(f"could not take the lock {self.path}: other launches keep changing it")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.lost:
            self._remove_if(self.run_id)

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the file ----------------------------------------------------------
    def _contents(self, started: float) -> dict[str, Any]:
        return dict(host=socket.gethostname(), pid=os.getpid(), run_id=self.run_id, started=started,
                    heartbeat=time.time(), lease_s=self.lease_s, command=" ".join(sys.argv))

    def _create(self) -> bool:
        """Create the lock file if there is none (atomically)."""
        self._started = time.time()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._contents(self._started), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _mutex(self):
        return _Mutex(self.path + ".mutex")

    def _remove_if(self, run_id: str | None) -> bool:
        """Remove the lock if it (still) belongs to `run_id` (None: if it is
        unreadable). False if the mutex is busy or the lock changed."""
        with self._mutex() as held:
            if not held:
                return False
            holder = read_holder(self.path)
            if (holder.run_id if holder else None) != run_id:
                return False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            return True

    def renew(self) -> bool:
        """One heartbeat: rewrite the lock with the current time if it is
        still ours; False (and `lost`) if another launch took it."""
        with self._mutex() as held:
            if not held:
                return True  # a takeover or another renewal is in progress; the next beat decides
            holder = read_holder(self.path)
            if holder is None or holder.run_id != self.run_id:
                self._lost.set()
                return False
            tmp = f"{self.path}.{self.run_id}.tmp"
            with open(tmp, "w") as f:
                json.dump(self._contents(holder.started), f)
            os.replace(tmp, self.path)
            return True

    def still_held(self) -> bool:
        """Read the lock now (before a save): whether it is still ours."""
        holder = read_holder(self.path)
        if holder is None or holder.run_id != self.run_id:
            self._lost.set()
        return not self.lost

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self.renew():
                        logging.warning("another launch took over workdir %s; this run stops at its next step",
                                        self.workdir)
                        return
                except OSError as e:  # a flaky shared filesystem: try again at the next beat
                    logging.warning("could not renew the lock %s (%s)", self.path, e)

        self._thread = threading.Thread(target=beat, name="moco-workdir-lock", daemon=True)
        self._thread.start()


class _Mutex:
    """`with _Mutex(path) as held:` an O_EXCL file, held for a few file
    operations; `held` is False if another process holds it. One left by a
    killed process is removed once it is _MUTEX_STALE_S old."""

    def __init__(self, path: str):
        self.path, self.held = path, False

    def __enter__(self) -> bool:
        for _ in range(20):
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                self.held = True
                return True
            except FileExistsError:
                try:
                    if time.time() - os.path.getmtime(self.path) > _MUTEX_STALE_S:
                        os.remove(self.path)
                        continue
                except FileNotFoundError:
                    continue
                time.sleep(0.05)
        return False

    def __exit__(self, *exc) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------
# Multi-process runs: process 0 holds the lock; all get the same verdict.
# ---------------------------------------------------------------------------
_MESSAGE_BYTES = 2048


def broadcast_message(message: str) -> str:
    """Process 0's `message` on every process ('' = none); a no-op for one process."""
    if jax.process_count() == 1:
        return message
    from jax.experimental import multihost_utils  # noqa: PLC0415

    encoded = message.encode()[:_MESSAGE_BYTES]
    buffer = np.zeros(_MESSAGE_BYTES, np.uint8)
    buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(received[received != 0].tolist()).decode(errors="replace")


def acquire_for_run(workdir: str, take_over: bool = False) -> WorkdirLock | None:
    """The workdir's lock, held by process 0 (None on the other processes).
    Raises WorkdirError on every process if process 0 cannot get it; after a
    takeover of a live holder, waits for it to notice before returning."""
    lock, message = None, ""
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire(take_over)
        except WorkdirError as e:
            lock, message = None, str(e)
    message = broadcast_message(message)
    if message:
        raise WorkdirError(message)
    if lock is not None and lock.took_over_live:
        wait = 1.5 * HEARTBEAT_S
        logging.warning("waiting %.0f s for the previous holder of %s to stop", wait, workdir)
        time.sleep(wait)
    return lock


@contextlib.contextmanager
def holding(workdir: str | None, take_over: bool = False):
    """`with holding(workdir) as lock:` the workdir's lock for a run
    (`acquire_for_run`), released at the end; no lock (None) without a workdir."""
    lock = acquire_for_run(workdir, take_over) if workdir else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
