"""The storage under a workdir: paths checkpoints can live at, what a failed
write means, and files written whole or not at all.

* `check_checkpoint_path`: at start-up, refuse a checkpoint folder that
  orbax could write to but never read back, or not write to at all: glob
  characters in its path (orbax finds its per-process files with a glob,
  so `job[1]/` silently produces unreadable checkpoints) and paths too long
  for the files orbax puts under them.
* `storage_cause`: the cause of a failed write in words (no space left,
  read-only, permission denied, path too long), from the error however deep
  orbax and tensorstore wrapped it.
"""

from __future__ import annotations

import errno
import os
import re
from typing import IO, Any, Callable

from moco_jax.core.errors import PathError, UserError

GLOB_CHARACTERS = "[]*?"
# The longest path orbax writes below the checkpoint folder, e.g.
# "1000000.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_63/d/<32 hex digits>", with room.
ORBAX_SUBPATH_CHARS = 160


class StorageError(UserError, OSError):
    """A checkpoint could not be written, or does not read back as written.

    Raised within a step or two of the failure; the run stops with one line.
    `abandon_threads`: orbax's background threads may still wait on the failed
    save, so the program exits without joining them (see launch/cli.py)."""

    abandon_threads = True


def path_max(directory: str) -> int:
    try:
        return os.pathconf(directory, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def check_checkpoint_path(directory: str) -> None:
    """PathError (one line) if checkpoints in `directory` (an existing
    folder) could not be written or read back."""
    real = os.path.realpath(directory)
    bad = sorted({c for c in real if c in GLOB_CHARACTERS})
    if bad:
        raise PathError(
            f"the checkpoint folder {real} contains {' '.join(bad)}: orbax-checkpoint finds its files with a glob "
            "pattern, so checkpoints written there could not be read back; use a --workdir whose path has none of "
            f"{' '.join(GLOB_CHARACTERS)}")
    limit = path_max(real)
    if len(real) + ORBAX_SUBPATH_CHARS > limit:
        raise PathError(
            f"the checkpoint folder's path is {len(real)} characters long and checkpoints add up to "
            f"{ORBAX_SUBPATH_CHARS} more, past this filesystem's limit of {limit}; use a shorter --workdir")


_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the path is too long",
    errno.EFBIG: "a file grew past the size this process may write",
    errno.EIO: "an input/output error of the device",
    errno.ENOENT: "a file or folder disappeared while it was written",
}
# tensorstore reports the OS error inside its message: "[OS error 28: No space left on device]".
_OS_ERROR_IN_TEXT = re.compile(r"OS error (\d+)|\[Errno (\d+)\]")


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def error_number(error: BaseException) -> int | None:
    """The OS error number behind `error` (an OSError in its chain, or one
    named in a tensorstore message), else None."""
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno:
            return link.errno
        match = _OS_ERROR_IN_TEXT.search(str(link))
        if match:
            return int(match.group(1) or match.group(2))
    if re.search(r"no space left", str(error), re.IGNORECASE):
        return errno.ENOSPC
    return None


def storage_cause(error: BaseException) -> str:
    """A failed write's cause in a few words."""
    number = error_number(error)
    if number in _CAUSES:
        return _CAUSES[number]
    if number is not None:
        return os.strerror(number)
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def write_file(path: str, content: bytes) -> None:
    """`content` as the file `path`, atomically (`write_atomic`)."""
    write_atomic(path, lambda f: f.write(content))


def write_atomic(path: str, write: Callable[[IO], Any], mode: str = "wb") -> None:
    """Call `write(f)` on a new file next to `path` (opened with `mode`),
    flush it to disk and rename it over `path`, so that a reader (or a kill,
    or a full disk) sees the old file or the whole new one. The file is created
    by a plain `open()`, so its mode is 0666 less the umask (0644 under the
    usual 022), as for any file the user writes."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
