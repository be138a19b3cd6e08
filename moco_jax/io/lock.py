"""One run per workdir: lock files with a heartbeat.

Two launches on one workdir (a job submitted twice, a relaunch while the
first run still trains) would both train, log every step twice and save over
each other's checkpoints. So a training run holds lock files: small JSON
files naming host, pid, run id, start time, the command, the kernel's boot id,
the PID namespace and the process's start time (`Holder`), and a heartbeat
that a background thread renews every `heartbeat_s` seconds.

Locks follow real locations, not spellings (`lock_paths`): a run holds
`realpath(workdir)/LOCK` and, when `workdir/checkpoints` is a link to a folder
elsewhere, also a LOCK in that folder (orbax ignores it) and, when that folder
is named `checkpoints`, the LOCK beside it (the lock of the workdir whose own
folder it is). Two workdirs that share one checkpoints folder thus share a
lock. All are taken in sorted order (those taken are released if one is
refused), renewed by one thread and released together.

A second launch finds a lock and refuses, in one line naming the holder,
unless the holder is dead:

* on the same host, after a reboot (the kernel's boot id changed);
* on the same host and PID namespace, its pid no longer runs, or now belongs
  to another process (its start time changed), or is this very process,
  which does not hold the lock;
* otherwise by watching: when the holder's pid says nothing (another PID
  namespace on this host: a container restarted in place) or its heartbeat
  cannot be trusted as it reads (older than its lease `lease_s`, or more than
  two heartbeats in the future: another host's clock may be off), the lock is
  re-read for 1.5 heartbeats (`heartbeat_s`, written in the lock; HEARTBEAT_S
  for older lock files) + 1 s. If it changes, the holder is alive (the
  refusal says how far its clock is off); if not, it is stale. A recent
  heartbeat refuses at once.

A stale lock is taken over with one warning saying why. `--take_over` takes
the lock from a holder that looks alive (without watching): it notices at its
next heartbeat (`lost`, `lost_to`) and stops without saving again, and the new
run waits that long before it reads the checkpoints. A lock file deleted by
hand while its run holds it is written again by that run (with a warning);
only a lock file with another run id means the lock was lost.

A lock file is created with O_EXCL, which is atomic on local filesystems and
on NFS v3+; every later change (renew, take over, remove) happens under a
short-lived mutex file, also created with O_EXCL, and a renewal or takeover
replaces the file in one rename, so a takeover cannot interleave with a
renewal and a reader never sees half a file. In a multi-process run process 0
holds the locks and every process gets the same verdict (`acquire_for_run`).
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
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from moco_jax.core.errors import WorkdirError

LOCK_NAME = "LOCK"
HEARTBEAT_S = 15.0  # how often the holder renews its heartbeat
LEASE_S = 120.0  # a heartbeat older than this means the holder is gone (once watching confirms it)
_MUTEX_STALE_S = 30.0  # a mutex file this old was left by a killed process
_CLOCK_NOTE_S = 2.0  # clocks further apart than this are named in messages
_HELD_HERE: set[str] = set()  # the run ids of the locks this process holds


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a workdir (a lock file's contents). The fields after
    `command` are missing from older lock files ('': unknown)."""

    host: str
    pid: int
    run_id: str
    started: float
    heartbeat: float
    lease_s: float
    command: str = ""
    heartbeat_s: float = HEARTBEAT_S
    boot_id: str = ""  # the kernel's boot id
    pid_ns: str = ""  # the holder's PID namespace, e.g. 'pid:[4026531836]'
    start_time: str = ""  # the holder's process start time (clock ticks since boot)
    workdir: str = ""  # the holder's workdir (real path)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        last = _since(self.heartbeat, now)
        return f"a run on host {self.host} (pid {self.pid}, started {started}, last heartbeat {last})"


def _since(heartbeat: float, now: float) -> str:
    ahead = round(heartbeat - now)
    return f"{ahead} s in the future (its clock is ahead)" if ahead >= 1 else f"{max(0, -ahead)} s ago"


def read_holder(path: str) -> Holder | None:
    """The lock at `path`, or None if there is none or it is unreadable."""
    try:
        with open(path) as f:
            fields = json.load(f)
        return Holder(**{k: fields[k] for k in Holder.__dataclass_fields__ if k in fields})
    except (OSError, ValueError, TypeError):
        return None


# -- where the locks are -----------------------------------------------------
def _checkpoint_folders(workdir: str) -> list[str]:
    """The real locations of `workdir`'s checkpoints folder: as the kernel
    resolves `workdir/checkpoints`, and as `workdirs.checkpoint_dir` spells
    it (abspath, which folds `..` before following links); usually one."""
    return list(dict.fromkeys(os.path.realpath(os.path.join(w, "checkpoints"))
                              for w in (workdir, os.path.abspath(workdir))))


def lock_paths(workdir: str) -> dict[str, str]:
    """The lock files of `workdir`, each mapped to the checkpoints folder it
    guards ('' for the workdir's own lock), in the order they are taken."""
    real = os.path.realpath(workdir)
    paths = {os.path.join(real, LOCK_NAME): ""}
    for folder in _checkpoint_folders(workdir):
        if folder == os.path.join(real, "checkpoints"):
            continue
        parent = os.path.dirname(folder)  # a workdir whose own checkpoints folder this is, if writable
        if os.path.basename(folder) == "checkpoints" and os.path.isdir(parent) and os.access(parent, os.W_OK):
            paths.setdefault(os.path.join(parent, LOCK_NAME), folder)
        if os.path.isdir(folder):
            paths.setdefault(os.path.join(folder, LOCK_NAME), folder)
    return dict(sorted(paths.items()))


# -- this process --------------------------------------------------------------
def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int | str = "self") -> str:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot); '' if unknown."""
    fields = _read_text(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# -- is the holder alive? ----------------------------------------------------
def _local_verdict(holder: Holder) -> tuple[str | None, str | None]:
    """For a holder on this host: (why its lock is stale, why only watching
    its heartbeat can tell); (None, None): its process runs."""
    boot = _boot_id()
    if holder.boot_id and boot and holder.boot_id != boot:
        return "this host has rebooted since", None
    ns = _pid_ns()
    if holder.pid_ns and ns and holder.pid_ns != ns:
        return None, f"its pid {holder.pid} is in another PID namespace (a container restarted in place?)"
    if not _pid_alive(holder.pid):
        return f"its process {holder.pid} no longer runs on this host", None
    start = _start_time(holder.pid)
    if holder.start_time and start and start != holder.start_time:
        return f"pid {holder.pid} now belongs to another process", None
    if holder.pid == os.getpid() and holder.run_id not in _HELD_HERE:
        return f"its pid {holder.pid} is this process, which does not hold it", None
    return None, None


def _heartbeat_doubt(holder: Holder, path: str, now: float) -> str | None:
    """Why the heartbeat cannot be trusted as it reads (too far in the
    future, or older than the lease); None: it is recent."""
    ahead = holder.heartbeat - now
    if ahead > 2 * holder.heartbeat_s:
        return f"its clock is {ahead:.0f} s ahead of this host's"
    try:
        touched = os.path.getmtime(path)
    except OSError:
        touched = holder.heartbeat
    age = now - max(holder.heartbeat, touched)
    if age > holder.lease_s:
        return f"its last heartbeat is {age:.0f} s old (lease {holder.lease_s:.0f} s)"
    return None


def _clock_note(skew: float) -> str:
    """'' or how far another clock (`skew` s ahead of ours) is off."""
    if abs(skew) < _CLOCK_NOTE_S:
        return ""
    return f"its clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} this host's"


def _watch(path: str, holder: Holder, seconds: float) -> tuple[Holder | None, float, float]:
    """Re-read the lock at `path` for up to `seconds` until it differs from
    `holder`: (what it then holds, None if it is gone; the writer's clock minus
    ours, from its new heartbeat; seconds watched). Unchanged: `holder` first."""
    start = last = time.time()
    poll = min(0.25, max(0.02, seconds / 50))
    while last - start < seconds:
        time.sleep(poll)
        seen, now = read_holder(path), time.time()
        if seen is None and os.path.exists(path):  # being written
            seen = holder
        if seen != holder:
            return seen, (seen.heartbeat - (last + now) / 2 if seen else 0.0), now - start
        last = now
    return holder, 0.0, last - start


class _Verdict(NamedTuple):
    """What `_judge` found out about a lock's holder."""

    stale: str | None = None  # why the lock is stale; None: its holder may be alive
    note: str = ""  # for a refusal: how far the holder's clock is off
    retry: bool = False  # the lock changed hands or went away while watched


def _judge(holder: Holder, path: str, now: float | None = None, watch: bool = True) -> _Verdict:
    """Whether `holder`'s lock at `path` is stale (see the module docstring);
    without `watch`, only what can be told at once."""
    now = time.time() if now is None else now
    doubt = None
    if holder.host == socket.gethostname():
        stale, doubt = _local_verdict(holder)
        if stale:
            return _Verdict(stale)
    doubt = doubt or _heartbeat_doubt(holder, path, now)
    if doubt is None or not watch:
        return _Verdict()
    seen, skew, watched = _watch(path, holder, 1.5 * holder.heartbeat_s + 1.0)
    if seen == holder:
        return _Verdict(f"its heartbeat did not advance in {watched:.0f} s; {doubt}")
    if seen is None or seen.run_id != holder.run_id:
        return _Verdict(retry=True)
    return _Verdict(note=_clock_note(skew))


def stale_reason(holder: Holder, path: str, now: float | None = None) -> str | None:
    """Why the lock of `holder` at `path` is stale, or None if it may still
    be held (this may watch the lock for 1.5 heartbeats + 1 s)."""
    return _judge(holder, path, now).stale


class WorkdirLock:
    """The locks of one workdir, held by this process while training.

        lock = WorkdirLock(workdir); lock.acquire(); ...; lock.release()

    `lost` turns True when another launch took a lock over (`lost_to` names
    it); the trainer then stops without saving."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, lease_s: float = LEASE_S):
        self.workdir = workdir
        self.path = os.path.join(os.path.realpath(workdir), LOCK_NAME)  # the workdir's own lock
        self.paths: dict[str, str] = {}  # all locks held (`lock_paths`), once acquired
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self.run_id = uuid.uuid4().hex
        self.took_over_live = False
        self.takeover_wait_s = 0.0  # how long the holders taken over need to notice
        self._started = time.time()
        self._lost = threading.Event()
        self._lost_to: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def lost_to(self) -> Holder | None:
        """The run that took a lock over from this one, if any."""
        return self._lost_to

    # -- acquire / release ---------------------------------------------------
    def acquire(self, take_over: bool = False) -> None:
        """Hold all the workdir's locks, or raise WorkdirError naming a holder."""
        os.makedirs(self.workdir, exist_ok=True)
        self.path = os.path.join(os.path.realpath(self.workdir), LOCK_NAME)
        self._started = time.time()
        taken = {}
        try:
            for path, folder in lock_paths(self.workdir).items():
                self._acquire_one(path, folder, take_over)
                taken[path] = folder
        except BaseException:
            for path in taken:
                with contextlib.suppress(OSError):
                    self._remove_if(path, self.run_id)
            raise
        self.paths = taken
        _HELD_HERE.add(self.run_id)
        self._start_heartbeat()

    def _acquire_one(self, path: str, folder: str, take_over: bool) -> None:
        for _ in range(50):
            if self._create(path):
                return
            holder = read_holder(path)
            if holder is None:  # being written, or garbage: give the writer a moment
                time.sleep(0.1)
                if read_holder(path) is None and self._replace_if(path, None):
                    logging.warning("replaced an unreadable lock file %s", path)
                    return
                continue
            verdict = _judge(holder, path, watch=not take_over)
            if verdict.retry:
                continue
            if verdict.stale is None and not take_over:
                raise WorkdirError(self._refusal(holder, folder, verdict.note))
            if self._replace_if(path, holder.run_id):
                if verdict.stale is None:
                    self.took_over_live = True
                    self.takeover_wait_s = max(self.takeover_wait_s, 1.5 * holder.heartbeat_s)
                    logging.warning("taking over workdir %s from %s (--take_over)", self.workdir, holder.describe())
                else:
                    logging.warning("taking over workdir %s from %s: %s", self.workdir, holder.describe(),
                                    verdict.stale)
                return
        raise WorkdirError(f"could not take the lock {path}: other launches keep changing it")

    def _refusal(self, holder: Holder, folder: str, note: str) -> str:
        via = f" (its checkpoints folder is {folder})" if folder else ""
        elsewhere = holder.workdir and holder.workdir != os.path.realpath(self.workdir)
        of = f" in workdir {holder.workdir}" if elsewhere else ""
        clock = f"; {note}" if note else ""
        return (f"workdir {self.workdir}{via} is in use by {holder.describe()}{of}{clock}; wait for it to finish or "
                "stop it, or relaunch with --take_over to take the workdir from it (that run then stops without "
                "saving)")

    def release(self) -> None:
        """Stop the heartbeat and remove the locks that are still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for path in self.paths:
            try:
                self._remove_if(path, self.run_id)
            except OSError as e:
                logging.warning("could not remove the lock %s (%s)", path, e)
        _HELD_HERE.discard(self.run_id)

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the files -----------------------------------------------------------
    def _contents(self) -> dict[str, Any]:
        return dict(host=socket.gethostname(), pid=os.getpid(), run_id=self.run_id, started=self._started,
                    heartbeat=time.time(), lease_s=self.lease_s, command=" ".join(sys.argv),
                    heartbeat_s=self.heartbeat_s, boot_id=_boot_id(), pid_ns=_pid_ns(), start_time=_start_time(),
                    workdir=os.path.realpath(self.workdir))

    def _create(self, path: str) -> bool:
        """Create the lock file at `path` if there is none (atomically)."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._contents(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _write(self, path: str) -> None:
        """Replace the lock file at `path` with ours, in one rename."""
        tmp = f"{path}.{self.run_id}.tmp"
        with open(tmp, "w") as f:
            json.dump(self._contents(), f)
        os.replace(tmp, path)

    def _replace_if(self, path: str, run_id: str | None) -> bool:
        """Make the lock at `path` ours if it (still) belongs to `run_id`
        (None: if it is unreadable). False if the mutex is busy or it changed."""
        with _Mutex(path + ".mutex") as held:
            holder = read_holder(path) if held else None
            if not held or (holder.run_id if holder else None) != run_id or not os.path.exists(path):
                return False
            self._write(path)
            return True

    def _remove_if(self, path: str, run_id: str) -> bool:
        """Remove the lock at `path` if it (still) belongs to `run_id`."""
        with _Mutex(path + ".mutex") as held:
            holder = read_holder(path) if held else None
            if holder is None or holder.run_id != run_id:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return True

    def _check(self, path: str, beat: bool) -> None:
        """Check that the lock at `path` is still ours: if another run's, set
        `lost` and `lost_to`; if it was removed, write it again; with `beat`,
        renew its heartbeat. Undecided (the mutex is busy, the file is being
        written): the next check decides."""
        holder = None if beat else read_holder(path)
        if holder is None:
            with _Mutex(path + ".mutex") as held:
                if not held:
                    return
                holder = read_holder(path)
                if holder is None and not os.path.exists(path) and self._create(path):
                    logging.warning("the lock file %s was removed while this run held it; written again", path)
                    return
                if holder is not None and holder.run_id == self.run_id and beat:
                    self._write(path)
        if holder is not None and holder.run_id != self.run_id:
            self._lost_to = holder
            self._lost.set()

    def renew(self) -> bool:
        """One heartbeat: rewrite the locks with the current time while they
        are ours; False (and `lost`) if another launch took one."""
        for path in self.paths:
            if not self.lost:
                self._check(path, beat=True)
        return not self.lost

    def still_held(self) -> bool:
        """Read the locks now (before a save): whether they are still ours."""
        for path in self.paths:
            if not self.lost:
                self._check(path, beat=False)
        return not self.lost

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self.renew():
                        logging.warning("another launch took over workdir %s (%s); this run stops at its next step",
                                        self.workdir, self.lost_to.describe() if self.lost_to else "")
                        return
                except OSError as e:  # a flaky shared filesystem: try again at the next beat
                    logging.warning("could not renew the locks of %s (%s)", self.workdir, e)

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
        wait = lock.takeover_wait_s
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
