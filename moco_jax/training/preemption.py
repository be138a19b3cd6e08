"""Stopping at a step boundary when the cluster asks: SIGTERM.

Schedulers give notice before they take the machines away, with SIGTERM and
a grace period: Cloud TPU VMs (preemptible and spot, and maintenance events),
SLURM at the time limit with `--signal=TERM@<seconds>`, Kubernetes on
eviction (`terminationGracePeriodSeconds`). The trainer then saves a
checkpoint at the next step boundary, waits for it to be written and exits 0,
and the relaunched command resumes exactly where it stopped.

* One process: a SIGTERM handler sets a flag that the loop reads after every
  step.
* Several processes: JAX's preemption service (started by
  `jax.distributed.initialize`) catches SIGTERM on any process and makes all
  processes agree on the step to stop at
  (`multihost_utils.reached_preemption_sync_point`, asked after every step),
  so that all of them save the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class PreemptionWatch:
    """`should_stop(step)` after every step: whether to save and stop now.

    Use as a context manager: the SIGTERM handler of a single-process run is
    installed on entry and the previous one restored on exit."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> PreemptionWatch:
        if self._multi:
            return self  # JAX's preemption service has its own SIGTERM handler
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training outside the main thread: SIGTERM will not save a checkpoint first")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        self.received = signum  # only a flag: the loop acts on it between steps

    def should_stop(self, step: int) -> bool:
        """Whether all processes stop after `step` (call it after every step)."""
        if self._multi:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = signal.SIGTERM
                return True
            return False
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
