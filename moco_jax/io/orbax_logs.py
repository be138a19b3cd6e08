"""Keeping orbax's own log records off the console while a checkpoint is
verified.

Reading a damaged checkpoint makes orbax log its errors about the damaged
files (with their contents) and leaves "Event loop is closed" errors behind
in its background reads; `quiet_orbax` drops both, so that the one warning
the caller writes says what happened. Imports nothing of orbax.
"""

from __future__ import annotations

import contextlib
import gc
import logging as logging_lib
import os
import sys


class _OrbaxSilenced(logging_lib.Filter):
    """Drops every record orbax logs: while a checkpoint is being verified,
    its errors about the damaged files (with their contents) would bury the
    one warning that says what happened."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


def _drop_closed_loop_noise(previous):
    """A sys.unraisablehook that drops the "Event loop is closed" errors
    orbax's background reads leave behind after a failed restore (they are
    reported when their futures are collected, after the failure itself has
    been handled) and passes everything else on."""

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_noise = True
    return hook


@contextlib.contextmanager
def quiet_orbax():
    # On the logger, not a handler: every handler (a console, a log file,
    # pytest's capture) then misses them alike.
    handler, quiet = logging_lib.getLogger("absl"), _OrbaxSilenced()
    handler.addFilter(quiet)
    asyncio_logger = logging_lib.getLogger("asyncio")
    level = asyncio_logger.level
    asyncio_logger.setLevel(logging_lib.CRITICAL)  # "Event loop is closed" after a failed async read
    if not getattr(sys.unraisablehook, "drops_closed_loop_noise", False):
        sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
    try:
        yield
    finally:
        gc.collect()  # let a failed read's leftovers be reported now, while the hook above is in place
        handler.removeFilter(quiet)
        asyncio_logger.setLevel(level)
