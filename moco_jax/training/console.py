"""The console of every program: short log lines printed above the progress
bar, third-party chatter kept off it, and the bar itself.

    11:16:25 INFO step 20/660: loss=5.225, top1=0.06797, ... (eta 0:31)

* `setup(verbose)` (called by `launch.cli.run` once flags are parsed)
  replaces absl's console handler with one that prints `time level message`
  through `tqdm.write`, so a line never lands in the middle of a bar. With
  `--verbose` absl's own handler and format stay, and nothing is filtered.
* Kept off the console unless `--verbose`: INFO records from outside
  moco_jax (JAX's TPU probe "Unable to initialize backend 'tpu'",
  tensorflow-datasets' "Failed to load ... from files" before our own error,
  orbax's save notices) and orbax's read-only notices, which read like a
  permissions problem but only echo the options a reader passes.
* `progress(steps, total)`: the bar on an interactive terminal only (a log
  captured to a file gets the log lines, no carriage returns); it starts
  after the first step, so its ETA leaves out compilation.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterator

import tqdm
from absl import logging as absl_logging

SHORT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
TIME_FORMAT = "%H:%M:%S"

# Warnings that only echo what a reader asked for (orbax, for every read-only
# checkpoint manager): message prefixes.
KNOWN_NOISE = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_ours(pathname: str) -> bool:
    """A record logged by moco_jax or by the program's own script, not by a
    library under site-packages."""
    path = os.path.abspath(pathname or "")
    if path.startswith(_PACKAGE_DIR + os.sep):
        return True
    return "site-packages" not in path and "dist-packages" not in path and "<frozen" not in path


class QuietThirdParty(logging.Filter):
    """Drops INFO records of other libraries and their known noise (see the
    module docstring); keeps every warning and error that means something."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return _is_ours(record.pathname)
        return not str(record.msg).startswith(KNOWN_NOISE)


class ConsoleHandler(logging.Handler):
    """Writes each record as one short line on stderr, above any progress bar."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(SHORT_FORMAT, TIME_FORMAT))
        self.addFilter(QuietThirdParty())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup(verbose: bool = False) -> None:
    """The console of a program (see the module docstring); idempotent."""
    root = logging.getLogger()
    if verbose:
        return  # absl's handler and format, everything shown
    absl_handler = absl_logging.get_absl_handler()
    if absl_handler in root.handlers:
        root.removeHandler(absl_handler)
    if not any(isinstance(h, ConsoleHandler) for h in root.handlers):
        root.addHandler(ConsoleHandler())


def is_terminal(stream=None) -> bool:
    """Whether `stream` (stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    return hasattr(stream, "isatty") and stream.isatty()


def progress(steps: range, total: int, enabled: bool) -> Iterator[int]:
    """Yields `steps`; with `enabled` and stderr a terminal, a tqdm bar (with
    ETA) that starts once the first step has run, so that compilation does
    not count in its rate."""
    it = iter(steps)
    first = next(it, None)
    if first is None:
        return
    yield first
    if not (enabled and is_terminal()):
        yield from it
        return
    with tqdm.tqdm(total=total, initial=first, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr) as bar:
        for step in it:
            yield step
            bar.update(1)


def eta(seconds: float) -> str:
    """A duration as the bar shows it: '0:31', '1:02:03'."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
