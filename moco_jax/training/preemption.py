"""SIGTERM and SIGINT, from start-up to exit: stop cleanly, never lose a step
that can be saved, never leave a stale workdir lock.

Schedulers give notice before they take the machines away, with SIGTERM and
a grace period: Cloud TPU VMs (preemptible and spot, and maintenance events),
SLURM at the time limit with `--signal=TERM@<seconds>`, Kubernetes on
eviction (`terminationGracePeriodSeconds`); LSF's `bkill` sends SIGINT
first, and so does Ctrl-C. What a signal does depends on the phase of the run
(`RunSignals.phase`):

* start-up and the final evaluation: the run stops at once
  (`Interrupted` is raised where it is), releases the workdir lock and says
  so in one line; no checkpoint is lost, since none is being written;
* training: the loop finishes the step it is in, saves a checkpoint of it,
  waits for the write and stops (`should_stop`);
* saving (waiting for the last asynchronous write): the save is completed
  first; the signal then takes effect.

A repeated SIGTERM (schedulers resend it) changes nothing. A second SIGINT
aborts at once (`Aborted`), without saving: the user pressed Ctrl-C twice.

Before a run's handlers are installed (the imports of `train.py`),
`exit_on_signal` makes either signal end the program at once with one line:
nothing is held yet.

Several processes: JAX's preemption service (started by
`jax.distributed.initialize`) owns SIGTERM; it makes all processes agree on
the step to stop at (`multihost_utils.reached_preemption_sync_point`, asked
after every step), so that all save the same step. SIGINT stays ours; the
trainer makes the processes agree on it at log steps.

This module imports no JAX at import time, so that `train.py` can install
its handlers first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else ""


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run outside the training steps (start-up, final
    evaluation), or after the step it saved. A KeyboardInterrupt, so that
    code catching Exception does not swallow it."""

    def __init__(self, signum: int, phase: str):
        super().__init__(f"stopped by {signal_name(signum)} during {phase}")
        self.signum, self.phase = signum, phase


class Aborted(Interrupted):
    """A second SIGINT: stop at once, without saving."""


def exit_on_signal() -> None:
    """Until a run installs its own: SIGTERM or SIGINT ends the program at
    once with one line (exit status 128 + the signal)."""

    def handle(signum, frame):
        del frame
        os.write(2, f"stopped by {signal_name(signum)} during start-up; nothing was written\n".encode())
        os._exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for sig in HANDLED:
            signal.signal(sig, handle)


class RunSignals:
    """`with RunSignals(multi_process) as signals:` a run's signal handling
    (see the module docstring); `with signals.phase("training", interruptible=False):`
    around each part of the run; `should_stop(step)` after every step."""

    def __init__(self, multi_process: bool = False):
        self.multi_process = multi_process
        self.received: int | None = None
        self.current = "start-up"
        self._interruptible = True
        self._raised = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> RunSignals:
        if threading.current_thread() is not threading.main_thread():
            from absl import logging  # noqa: PLC0415

            logging.warning("training outside the main thread: SIGTERM and SIGINT will not save a checkpoint first")
            return self
        # With several processes JAX's preemption service handles SIGTERM.
        for sig in (signal.SIGINT,) if self.multi_process else HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def phase(self, name: str, interruptible: bool):
        """Run the block as phase `name`. Entering an interruptible phase with
        a signal pending raises Interrupted at once."""
        previous = (self.current, self._interruptible)
        self.current, self._interruptible = name, interruptible
        try:
            if interruptible and self.received is not None:
                self._raise(self.received)
            yield self
        finally:
            self.current, self._interruptible = previous

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self.received == signal.SIGINT and not isinstance(self._raised, Aborted):
            self._raised = Aborted(signum, self.current)
            raise self._raised
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT and not self._interruptible:
                os.write(2, b"SIGINT: saving a checkpoint at the end of this step, then stopping (Ctrl-C again "
                            b"aborts at once, without saving)\n")
        if self._interruptible:
            self._raise(signum)

    def _raise(self, signum: int) -> None:
        if self._raised:
            return  # already on its way out: let the clean-up run
        self._raised = Interrupted(signum, self.current)
        raise self._raised

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process calls it
        after every step). One process: any signal received. Several: a
        SIGTERM, agreed on through JAX's preemption sync point; a SIGINT is
        this process's alone, so the trainer makes the processes agree on it."""
        if not self.multi_process:
            return self.received is not None
        from jax.experimental import multihost_utils  # noqa: PLC0415

        if multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or signal.SIGTERM
            return True
        return False

    @property
    def signal_name(self) -> str:
        return signal_name(self.received)


def exit_status(signum: int, saved: bool) -> int:
    """0 after a SIGTERM whose run left everything saved in a workdir (a
    scheduler's requeue, or the user, relaunches the same command), else
    128 + the signal (130 for Ctrl-C)."""
    return 0 if signum == signal.SIGTERM and saved else 128 + signum
