"""One run per workdir: the lock, its heartbeat, stale locks and takeovers,
and two real launches racing for one workdir."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moco_jax.core.errors import WorkdirError
from moco_jax.io import lock as lock_lib
from moco_jax.training import metrics

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
# tests/tiny.py's config as train.py flags: 8 emulated devices x 2 images.
TINY_FLAGS = ["--config.image_size=8", "--config.crop_size=8", "--config.model.width=4", "--config.embed_dim=8",
              "--config.batch_size=16", "--config.queue_size=32", "--config.bn_splits=1",
              "--config.eval_batch_size=512", "--config.log_every_steps=1"]


def _fake_lock(workdir, *, host, pid, heartbeat_age, lease_s=lock_lib.LEASE_S):
    """A lock file as another run would have left it, last touched `heartbeat_age` s ago."""
    now = time.time()
    path = workdir / lock_lib.LOCK_NAME
    path.write_text(json.dumps(dict(host=host, pid=pid, run_id="other-run", started=now - 3600,
                                    heartbeat=now - heartbeat_age, lease_s=lease_s, command="train.py")))
    os.utime(path, (now - heartbeat_age, now - heartbeat_age))
    return path


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_on_a_held_workdir_refuses_naming_the_holder(tmp_path):
    first = lock_lib.WorkdirLock(str(tmp_path))
    first.acquire()
    try:
        holder = json.loads((tmp_path / "LOCK").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(WorkdirError, match=rf"in use by a run on host {socket.gethostname()} \(pid "
                                               rf"{os.getpid()}, .*--take_over") as error:
            lock_lib.WorkdirLock(str(tmp_path)).acquire()
        assert "\n" not in str(error.value)
    finally:
        first.release()
    assert not (tmp_path / "LOCK").exists()
    second = lock_lib.WorkdirLock(str(tmp_path))  # free again
    second.acquire()
    second.release()


def test_heartbeat_renews_the_lock(tmp_path):
    held = lock_lib.WorkdirLock(str(tmp_path), heartbeat_s=0.2)
    held.acquire()
    try:
        first = json.loads((tmp_path / "LOCK").read_text())["heartbeat"]
        deadline = time.time() + 20
        while json.loads((tmp_path / "LOCK").read_text())["heartbeat"] == first:
            assert time.time() < deadline, "the heartbeat was never renewed"
            time.sleep(0.1)
        assert not held.lost
    finally:
        held.release()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    _fake_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), heartbeat_age=1)
    taker = lock_lib.WorkdirLock(str(tmp_path))
    taker.acquire()
    taker.release()
    assert "no longer runs on this host" in caplog.text


def test_lock_with_an_expired_lease_on_another_host_is_taken_over(tmp_path, caplog):
    _fake_lock(tmp_path, host="node-17", pid=1, heartbeat_age=lock_lib.LEASE_S + 60)
    taker = lock_lib.WorkdirLock(str(tmp_path))
    taker.acquire()
    assert json.loads((tmp_path / "LOCK").read_text())["run_id"] == taker.run_id
    taker.release()
    assert "heartbeat is" in caplog.text and "node-17" in caplog.text


def test_live_lock_on_another_host_refuses_unless_taken_over(tmp_path):
    _fake_lock(tmp_path, host="node-17", pid=1, heartbeat_age=5)
    with pytest.raises(WorkdirError, match="in use by a run on host node-17 .*last heartbeat 5 s ago"):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    taker = lock_lib.WorkdirLock(str(tmp_path))
    taker.acquire(take_over=True)
    assert taker.took_over_live
    taker.release()


def test_the_holder_notices_a_takeover_and_does_not_touch_the_new_lock(tmp_path):
    holder = lock_lib.WorkdirLock(str(tmp_path), heartbeat_s=3600)  # beats by hand below
    holder.acquire()
    taker = lock_lib.WorkdirLock(str(tmp_path))
    taker.acquire(take_over=True)
    assert holder.renew() is False and holder.lost and not holder.still_held()
    holder.release()  # must not remove the taker's lock
    assert json.loads((tmp_path / "LOCK").read_text())["run_id"] == taker.run_id
    taker.release()


def test_an_unreadable_lock_file_is_replaced(tmp_path):
    (tmp_path / "LOCK").write_text("{not json")
    taker = lock_lib.WorkdirLock(str(tmp_path))
    taker.acquire()
    taker.release()


def _launch(workdir, *flags, env=None):
    command = [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", *TINY_FLAGS, *flags]
    child_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                     **(env or {}))
    return subprocess.Popen(command, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _communicate(proc):
    try:
        return proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_two_concurrent_launches_on_one_workdir_train_once(tmp_path):
    """Both start at once; one trains, the other refuses in one line naming
    the winner; every step is trained and logged once."""
    procs = [_launch(tmp_path, "--config.num_train_steps=6") for _ in range(2)]
    results = [(p, *_communicate(p)) for p in procs]
    winners = [r for r in results if r[0].returncode == 0]
    losers = [r for r in results if r[0].returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [r[2][-2000:] for r in results]
    (winner, _, _), (loser, _, err) = winners[0], losers[0]
    assert loser.returncode == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: workdir ") and f"(pid {winner.pid}," in last, err[-2000:]
    steps = [r["step"] for r in map(json.loads, (tmp_path / metrics.JSONL_NAME).read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 7))
    assert not (tmp_path / "LOCK").exists()  # released at the end


def test_a_run_whose_lock_is_taken_over_stops_without_saving(tmp_path):
    """In-process: at step 2 another launch takes the workdir (--take_over);
    the run stops at its next check with one line, and saves nothing more."""
    from moco_jax.training import trainer  # noqa: PLC0415
    from tiny import tiny_config  # noqa: PLC0415

    make_real_step = trainer.make_train_step
    taker = lock_lib.WorkdirLock(str(tmp_path))

    def make_step_then_taken_over(*args):
        real = make_real_step(*args)

        def step(p_state, batch):
            if int(p_state.step.addressable_shards[0].data[0]) == 2:
                taker.acquire(take_over=True)
            return real(p_state, batch)

        return step

    trainer.make_train_step = make_step_then_taken_over
    try:
        config = tiny_config(num_train_steps=8, log_every_steps=1, checkpoint_every_steps=2)
        with pytest.raises(WorkdirError, match="another launch took over workdir .* stopped without saving"):
            trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    finally:
        trainer.make_train_step = make_real_step
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # nothing after the takeover
    assert json.loads((tmp_path / "LOCK").read_text())["run_id"] == taker.run_id  # the taker's lock untouched
    taker.release()
