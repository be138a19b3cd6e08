"""SIGTERM (a preempted TPU VM, SLURM's --signal, Kubernetes eviction):
save at the next step boundary, exit 0, and resume exactly on relaunch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from moco_jax.training import loop as loop_lib
from moco_jax.training import metrics, trainer
from test_workdir_lock import TINY_FLAGS
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
# A constant learning rate ("step" drops only at epoch 120), so that the
# schedule does not depend on the run's length: the interrupted run, its
# relaunch and the reference follow the same one.
RECIPE = dict(lr_schedule="step", log_every_steps=1, checkpoint_every_steps=1000)


def _logged_steps(workdir: Path) -> list[int]:
    try:
        lines = (workdir / metrics.JSONL_NAME).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def _train_py(workdir, num_steps):
    flags = TINY_FLAGS + [f"--config.{k}={v}" for k, v in RECIPE.items()] + [f"--config.num_train_steps={num_steps}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# A train.py run stopped by SIGTERM, resumed by a new process, bit-exact with
# an uninterrupted run: tests/test_resume_across_processes.py; every other
# phase and SIGINT: tests/test_signals.py.


def test_sigterm_without_a_workdir_says_nothing_was_saved(tmp_path):
    """In-process: the handler is installed for the run and removed after."""
    config = tiny_config(**RECIPE, num_train_steps=50)
    make_real_step = trainer.make_train_step

    def make_step_that_is_preempted(*args):
        real = make_real_step(*args)

        def step(p_state, batch):
            if int(p_state.step.addressable_shards[0].data[0]) == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 runs
            return real(p_state, batch)

        return step

    before = signal.getsignal(signal.SIGTERM)
    trainer.make_train_step = make_step_that_is_preempted
    try:
        result = trainer.train_and_evaluate(config, workdir=None, show_progress=False)
    finally:
        trainer.make_train_step = make_real_step
    assert result["preempted"] == 3 and int(result["state"].step) == 3
    assert "knn_trained" not in result
    assert signal.getsignal(signal.SIGTERM) is before
    assert np.all(np.isfinite(jax.tree.leaves(result["state"].params)[0]))


def test_with_several_processes_a_sigint_of_any_process_stops_all_at_the_next_log_step(monkeypatch):
    """The agreement logic, with the collectives replaced: a SIGTERM is the
    preemption sync point's (every step); a SIGINT that only another process
    received stops this one too, at a log step, never between them."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from moco_jax.core import sharding  # noqa: PLC0415
    from moco_jax.training import preemption  # noqa: PLC0415

    others_interrupted = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 9)
    monkeypatch.setattr(sharding, "any_process_each", lambda flags: [f or bool(others_interrupted) for f in flags])
    loop = loop_lib.Loop(None, loop_lib.Plan(10, 5, 5, 5), None, batch_size=16, num_devices=8)
    signals = preemption.RunSignals(multi_process=True)
    assert not loop._should_stop(1, signals, agree=True)
    others_interrupted.append(True)  # another process got Ctrl-C
    assert not loop._should_stop(2, signals, agree=False)  # not between log steps: all must agree on the step
    assert loop._should_stop(3, signals, agree=True) and signals.received == signal.SIGINT
    fresh = preemption.RunSignals(multi_process=True)
    others_interrupted.clear()
    assert not loop._should_stop(8, fresh, agree=True) and loop._should_stop(9, fresh, agree=False)
    assert fresh.received == signal.SIGTERM


def test_with_several_processes_a_failed_save_stops_all_with_process_0s_message(monkeypatch, tmp_path):
    from moco_jax.core import sharding  # noqa: PLC0415
    from moco_jax.io import lock as lock_lib  # noqa: PLC0415
    from moco_jax.io.storage import StorageError  # noqa: PLC0415

    class FailedSaver:
        def poll(self):
            return StorageError("checkpoint 4 could not be written to W/checkpoints/4: no space left on the device")

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding, "any_process_each", lambda flags: list(flags))
    monkeypatch.setattr(lock_lib, "broadcast_message", lambda message: message)
    loop = loop_lib.Loop(None, loop_lib.Plan(10, 5, 5, 5), str(tmp_path), batch_size=16, num_devices=8)
    loop._check_health(FailedSaver(), agree=False)  # only where the processes agree
    with pytest.raises(OSError, match="checkpoint 4 could not be written .* no space left"):
        loop._check_health(FailedSaver(), agree=True)
