"""The one training loop: every program that trains runs its steps here.

    loop = Loop(task, plan, workdir, batch_size=..., num_devices=..., lock=lock)
    p_state, history = loop.run(p_state, batches, start_step, show_progress, signals)

Pretraining (`trainer.Pretraining`) and the linear probe (`probe.Probe`)
are `Task`s: each says what one step is, which metrics must stay finite,
what its schedule logs, what it evaluates on the way and what a checkpoint
holds. The loop owns everything else, the same for both: the progress bar
and ETA, logging (metrics.jsonl, TensorBoard, W&B, the console), the NaN
guard, checkpoints every `checkpoint_every` steps, a clean stop on SIGTERM
or SIGINT with the step saved (training/preemption.py), and stopping when
another launch took the workdir over or a checkpoint failed to save.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Iterator, Protocol, Sequence

import jax
import numpy as np
from absl import logging

from moco_jax.core import sharding
from moco_jax.core.config import is_due
from moco_jax.core.errors import DivergedError, WorkdirError
from moco_jax.io import lock as workdir_lock
from moco_jax.io.saver import CheckpointWriter
from moco_jax.io.storage import StorageError
from moco_jax.training import console, metrics, preemption


class Task(Protocol):
    """What one kind of training plugs into `Loop`."""

    GUARDED: tuple[str, ...]  # the step metrics that must stay finite (the NaN guard)

    def step(self, p_state: Any, batch: Any) -> tuple[Any, dict[str, jax.Array]]:
        """One pmap-ed step on the device batch: (state, metrics (n_devices,) each)."""

    def schedule(self, step: int) -> dict[str, float]:
        """What the schedule was at `step` (learning rate, epoch, ...): logged with its metrics."""

    def first(self, p_state: Any) -> dict[str, float]:
        """Logged at step 0 of a run that starts from scratch ({} for nothing)."""

    def monitor(self, p_state: Any, step: int, last: bool) -> dict[str, float]:
        """Logged at the monitor steps (`Plan.monitor_every`); `last`: the run's last step."""

    def save(self, saver: CheckpointWriter, p_state: Any, step: int) -> None:
        """Checkpoint the state after `step`."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long a run is and what happens when, in steps (0 = only at the end)."""

    total_steps: int
    steps_per_epoch: int
    log_every: int
    checkpoint_every: int
    monitor_every: int = 0
    checkpoints_to_keep: int = 3


def summarize(pending: Sequence[dict[str, jax.Array]], step: int, guarded: Sequence[str],
              resumed_from: int = 0) -> dict[str, float]:
    """Mean of the metrics of the steps since the last log (one device's
    copy: the steps average them over the devices). Within the training
    steps, this and `assert_finite` are the only places the host waits for
    the devices (monitors and checkpoints wait too)."""
    stacked = jax.device_get(list(pending))
    summary = {k: float(np.mean([np.asarray(m[k])[0] for m in stacked])) for k in stacked[0]}
    assert_finite([summary[k] for k in guarded], step, resumed_from)
    return summary


def assert_finite(values, step: int, resumed_from: int = 0) -> None:
    """The NaN guard on losses and gradient norms: stop before a non-finite
    state can be logged as fine or saved over the last good checkpoint."""
    values = np.asarray(jax.device_get(values), np.float64)
    if not np.all(np.isfinite(values)):
        # Restored checkpoints are verified against their checksums, so a
        # resumed state is the one that was saved: the cause is the recipe.
        resumed = f" (this run resumed from verified checkpoint {resumed_from})" if resumed_from else ""
        raise DivergedError(
            f"non-finite loss or gradient at or before step {step}{resumed}; training stopped and the last good "
            "checkpoint (if any) is kept: lower the learning rate or check the data before relaunching"
        )


class _Eta:
    """The time left, from the steps run since the first one (which
    compiles, and so is left out of the rate)."""

    def __init__(self, last: int):
        self.last, self.first, self.start = last, None, 0.0

    def stepped(self, step: int) -> None:
        if self.first is None:
            self.first, self.start = step, time.perf_counter()

    def left(self, step: int) -> str:
        """'(eta 0:31)', or '' before a rate is known or after the last step."""
        if self.first is None or step <= self.first or step >= self.last:
            return ""
        rate = (time.perf_counter() - self.start) / (step - self.first)
        return f"(eta {console.eta(rate * (self.last - step))})"


class Loop:
    """Steps, logging, monitors and checkpoints of one run of a `Task`."""

    def __init__(self, task: Task, plan: Plan, workdir: str | None, *, batch_size: int, num_devices: int,
                 lock=None, config=None):
        self.task, self.plan, self.workdir = task, plan, workdir
        self.batch_size, self.num_devices = batch_size, num_devices
        self.lock = lock  # process 0's WorkdirLock (None elsewhere, and without a workdir)
        self.config = config  # for the metric writer (W&B fields)
        self.preempted_at = 0  # the step a signal stopped the run at (after saving it)

    def run(self, p_state, batches: Iterator, start_step: int, show_progress: bool,
            signals: preemption.RunSignals | None = None):
        """Steps start_step+1 .. total_steps, or until a signal; returns (p_state, logged history)."""
        plan, task = self.plan, self.task
        last = plan.total_steps
        signals = signals or preemption.RunSignals(jax.process_count() > 1)
        writer = metrics.MetricWriter(self.workdir, self.config)
        saver = CheckpointWriter(self.workdir, plan.checkpoints_to_keep) if self.workdir else None
        history, pending = [], []
        if start_step == 0:
            first = task.first(p_state)
            if first:
                writer.write(0, first)
        last_time, last_step = time.perf_counter(), start_step
        timer = _Eta(last)
        try:
            for step in console.progress(range(start_step + 1, last + 1), last,
                                         show_progress and jax.process_index() == 0):
                p_state, step_metrics = task.step(p_state, next(batches))
                pending.append(step_metrics)
                timer.stepped(step)
                logged = is_due(step, plan.log_every, last)
                if logged:
                    summary = summarize(pending, step, task.GUARDED, start_step)
                    now = time.perf_counter()
                    summary.update(self._throughput(step - last_step, now - last_time), **task.schedule(step))
                    writer.write(step, summary, progress=f"/{last} {timer.left(step)}".rstrip())
                    history.append({"step": step, **summary})
                    pending, last_time, last_step = [], now, step
                if is_due(step, plan.monitor_every, last):
                    monitored = task.monitor(p_state, step, step == last)
                    if monitored:
                        writer.write(step, monitored)
                    last_time = time.perf_counter()  # the monitor's time is not training time
                stop = self._should_stop(step, signals, agree=logged)
                save = saver is not None and (is_due(step, plan.checkpoint_every, last) or stop)
                self._check_health(saver, agree=logged or save)
                if save:
                    assert_finite([[m[k] for k in task.GUARDED] for m in pending], step, start_step)
                    task.save(saver, p_state, step)
                    last_time = time.perf_counter()
                if stop:
                    self.preempted_at = step
                    logging.warning("%s at step %d: %s", signals.signal_name, step,
                                    f"saving checkpoint {step}" if saver else "no --workdir, nothing saved")
                    break
        finally:
            try:
                if saver:
                    saver.finish()  # a good save in flight is completed and checked, even on an error
            finally:
                writer.close()
        return p_state, history

    def _should_stop(self, step: int, signals: preemption.RunSignals, agree: bool) -> bool:
        """Whether a signal stops the run after `step`, on every process
        alike: SIGTERM through JAX's preemption sync point (every step), a
        SIGINT of any process at log and checkpoint steps."""
        if signals.should_stop(step):
            return True
        if jax.process_count() == 1 or not agree:
            return False
        (interrupted,) = sharding.any_process_each([signals.received == signal.SIGINT])
        if interrupted and signals.received is None:
            signals.received = signal.SIGINT
        return interrupted

    def _check_health(self, saver: CheckpointWriter | None, agree: bool) -> None:
        """Stop if another launch took the workdir over (without saving) or
        the last checkpoint failed to save or read back. One process: after
        every step (the lock is re-read at log and checkpoint steps); several:
        at log and checkpoint steps, where they agree."""
        if not self.workdir:
            return
        failure = saver.poll() if saver is not None else None
        lost = self.lock is not None and (self.lock.lost or (agree and not self.lock.still_held()))
        if jax.process_count() > 1:
            if not agree:
                return
            lost, failed = sharding.any_process_each([lost, failure is not None])
            if failed:
                failure = StorageError(workdir_lock.broadcast_message(str(failure or ""))
                                       or "a checkpoint failed to save on another process; training stopped")
        if lost:
            holder = getattr(self.lock, "lost_to", None)
            by = f" ({holder.describe()})" if holder is not None else ""
            raise WorkdirError(f"another launch{by} took over workdir {self.workdir} (--take_over); this run "
                               "stopped without saving so as not to write over its checkpoints")
        if failure is not None:
            raise failure

    def _throughput(self, steps: int, seconds: float) -> dict[str, float]:
        images_per_sec = steps * self.batch_size / seconds
        return {
            "images_per_sec": images_per_sec,
            "images_per_sec_per_device": images_per_sec / self.num_devices,
            "step_time_ms": 1000 * seconds / steps,
        }
