"""SIGTERM and SIGINT at every phase of a train.py run: one line, the lock
released, nothing lost that was being saved (tests/signal_worker.py pauses
the run at a known point until the signal arrives)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moco_jax.io import checkpoint
from moco_jax.training import metrics
from test_workdir_lock import TINY_FLAGS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "signal_worker.py"
TIMEOUT = 240


def _start(workdir, pause, *flags, after=0.0, tiny=TINY_FLAGS):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               MOCO_TEST_PAUSE=pause, MOCO_TEST_PAUSE_AFTER=str(after))
    command = [sys.executable, str(WORKER), f"--workdir={workdir}", *tiny, "--config.num_train_steps=4",
               "--config.checkpoint_every_steps=2", *flags]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _when_paused(proc):
    """Wait for the worker's "paused ..." line."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("paused"):
            return line.strip()
        assert line or proc.poll() is None, proc.communicate()[1][-3000:]
    raise AssertionError("the worker never paused")


def _finish(proc):
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


def _last_line(text):
    return text.strip().splitlines()[-1]


def _steps(workdir):
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def test_sigterm_during_start_up_ends_in_one_line_and_releases_the_lock(tmp_path):
    proc = _start(tmp_path, "startup")
    _when_paused(proc)
    proc.send_signal(signal.SIGTERM)
    status, out, err = _finish(proc)
    assert status == 0, err[-3000:]
    assert "Traceback" not in err
    assert _last_line(out) == (f"stopped by SIGTERM during start-up: nothing was trained; the checkpoints in "
                                      f"{tmp_path} are as they were; relaunch the same command to resume")
    assert not (tmp_path / "LOCK").exists()


def test_sigint_during_training_saves_the_step_and_stops_in_one_line(tmp_path):
    proc = _start(tmp_path, "step:3")
    _when_paused(proc)
    proc.send_signal(signal.SIGINT)
    status, out, err = _finish(proc)
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert _last_line(out) == (f"stopped by SIGINT after step 3: checkpoint 3 is saved in {tmp_path}; "
                                      "relaunch the same command to resume")
    assert _steps(tmp_path) == [2, 3]
    assert not (tmp_path / "LOCK").exists()


def test_a_second_sigint_aborts_without_saving_and_releases_the_lock(tmp_path):
    proc = _start(tmp_path, "step:3", after=1.0)
    _when_paused(proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    status, out, err = _finish(proc)
    assert status == 130, err[-3000:]
    assert "Traceback" not in err
    assert _last_line(err).startswith("aborted by a second SIGINT during training: the steps since the last "
                                             "checkpoint are not saved")
    assert _steps(tmp_path) == [2]
    assert not (tmp_path / "LOCK").exists()


def test_repeated_sigterms_during_the_last_save_wait_for_it(tmp_path):
    """A scheduler resends SIGTERM: three of them while the last checkpoint
    is being written; the save completes, verified, and the run stops before
    its final evaluation with one line."""
    proc = _start(tmp_path, "save", after=0.5)
    _when_paused(proc)
    for _ in range(3):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.07)
    status, out, err = _finish(proc)
    assert status == 0, err[-3000:]
    assert "Traceback" not in err
    assert _last_line(out) == (f"stopped by SIGTERM during the final evaluation: training is complete and "
                                      f"checkpoint 4 is saved in {tmp_path}; relaunch the same command to evaluate it")
    assert _steps(tmp_path) == [2, 4]
    manager = checkpoint.make_manager(str(tmp_path))
    try:
        checkpoint.read_verified(manager, 4)  # whole and intact
    finally:
        manager.close()
    assert not (tmp_path / "LOCK").exists() and not (tmp_path / metrics.FINAL_NAME).exists()


def test_sigterm_during_the_final_evaluation_keeps_the_checkpoint_and_releases_the_lock(tmp_path):
    proc = _start(tmp_path, "final")
    _when_paused(proc)
    proc.send_signal(signal.SIGTERM)
    status, out, err = _finish(proc)
    assert status == 0, err[-3000:]
    assert _last_line(out).startswith("stopped by SIGTERM during the final evaluation: training is complete")
    assert _steps(tmp_path) == [2, 4] and not (tmp_path / "LOCK").exists()
