"""Storage errors during a run: a checkpoint that cannot be written stops
the run within a step, with one line naming the path and the cause, and the
program exits at once (orbax's threads would wait minutes on the failed save).

The full disk and the read-only folder are real: a small tmpfs and a
read-only bind mount in a private mount namespace (`unshare`)."""

import errno
import os
import re
import shutil
import subprocess
import sys

import pytest

from moco_jax.io import storage
from moco_jax.training import metrics
from test_workdir_lock import REPO, TINY_FLAGS

WORKER = REPO / "tests" / "signal_worker.py"
TIMEOUT = 180


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mounts = pytest.mark.skipif(not _can_mount(), reason="needs `unshare -rm` (util-linux and user namespaces) "
                                                           "to mount a small or read-only filesystem")


def _in_mount_namespace(script, workdir, *flags, pause=""):
    """Runs `script` (sh, with $W the workdir and $TRAIN the training command)
    in a private mount namespace."""
    train = [sys.executable, str(WORKER), f"--workdir={workdir}", *TINY_FLAGS, "--config.log_every_steps=1",
             "--config.num_train_steps=30", "--config.checkpoint_every_steps=10", *flags]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               W=str(workdir), TRAIN=" ".join(train), MOCO_TEST_PAUSE=pause,
               MOCO_TEST_GO_ON_FILE=str(workdir / "go_on"))
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _logged(workdir):
    return [r["step"] for r in metrics.read_jsonl(str(workdir)) if "loss" in r]


def _assert_one_error_line(run, cause, step=10):
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "RESOURCE_EXHAUSTED" not in run.stderr, run.stderr[-3000:]
    assert lines[-1].startswith(f"error: checkpoint {step} could not be written to "), lines[-1]
    assert f"/checkpoints/{step}: {cause}; training stopped" in lines[-1]
    assert len([line for line in lines if line.strip() and not re.match(r"\d\d:\d\d:\d\d INFO ", line)]) == 1, \
        run.stderr[-3000:]


@needs_mounts
@pytest.mark.slow
def test_a_full_disk_stops_the_run_within_a_step_in_one_line(tmp_path):
    script = 'mkdir -p "$W/checkpoints" && mount -t tmpfs -o size=64k tmpfs "$W/checkpoints" && exec $TRAIN'
    run = _in_mount_namespace(script, tmp_path)
    _assert_one_error_line(run, "no space left on the device")
    assert max(_logged(tmp_path)) < 20  # found within a few steps (how many: the machine's load), not at the next save (step 20)
    assert not (tmp_path / "LOCK").exists()


@needs_mounts
@pytest.mark.slow
def test_checkpoints_turned_read_only_mid_run_stop_it_at_once_without_hanging(tmp_path):
    script = ('mkdir -p "$W/checkpoints" && mount --bind "$W/checkpoints" "$W/checkpoints" && '
              '($TRAIN > "$W/out" 2> "$W/err" & echo $! > "$W/pid"; wait) & '
              'until grep -q paused "$W/out" 2>/dev/null; do sleep 0.1; done; '
              'mount -o remount,bind,ro "$W/checkpoints" && touch "$W/go_on"; wait; '
              'cat "$W/err" >&2')
    run = _in_mount_namespace(script, tmp_path, pause="step:5")
    err = run.stderr
    assert "error: checkpoint 10 could not be written to" in err and "the filesystem is read-only" in err, err[-3000:]
    assert "Traceback" not in err
    assert max(_logged(tmp_path)) < 20  # before the next save (step 20)
    assert not (tmp_path / "LOCK").exists()


@needs_mounts
@pytest.mark.slow
def test_a_read_only_checkpoint_folder_is_refused_at_start_up(tmp_path):
    script = ('mkdir -p "$W/checkpoints" && mount --bind "$W/checkpoints" "$W/checkpoints" && '
              'mount -o remount,bind,ro "$W/checkpoints" && exec $TRAIN')
    run = _in_mount_namespace(script, tmp_path)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: workdir ") and "is not writable (the filesystem is read-only" in last, last
    assert not (tmp_path / metrics.JSONL_NAME).exists()


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "x": [OS error 28: No space left on device]'),
     "no space left on the device"),
    (OSError(errno.EROFS, "Read-only file system"), "the filesystem is read-only"),
    (OSError(errno.ENAMETOOLONG, "File name too long"), "the path is too long"),
    (RuntimeError("something else"), "RuntimeError: something else"),
])
def test_the_cause_of_a_failed_write_in_words(error, cause):
    wrapped = RuntimeError("orbax gave up")
    wrapped.__cause__ = error
    assert storage.storage_cause(error) == cause
    if not isinstance(error, RuntimeError):
        assert storage.storage_cause(wrapped) == cause
