"""One run per workdir: the lock, its heartbeat, stale locks and takeovers,
and two real launches racing for one workdir."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
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


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")


def _fake_lock(workdir, *, host, pid, heartbeat_age, lease_s=lock_lib.LEASE_S, heartbeat_s=0.2, **fields):
    """A lock file as another run would have left it, last touched `heartbeat_age` s ago by its clock
    (negative: in the future). Its small `heartbeat_s` keeps watching it short (1.5 x 0.2 + 1 s)."""
    now = time.time()
    path = workdir / lock_lib.LOCK_NAME
    path.write_text(json.dumps(dict(host=host, pid=pid, run_id="other-run", started=now - 3600,
                                    heartbeat=now - heartbeat_age, lease_s=lease_s, command="train.py",
                                    heartbeat_s=heartbeat_s, **fields)))
    os.utime(path, (now - heartbeat_age, now - heartbeat_age))
    return path


@contextlib.contextmanager
def _beating(path, clock_ahead_s=0.0):
    """The fake lock at `path` kept alive by a holder whose clock is `clock_ahead_s` s ahead of ours
    (heartbeat and file time both by its clock, as on a filesystem that takes the writer's times)."""
    fields, stop = json.loads(path.read_text()), threading.Event()

    def beat():
        while not stop.wait(0.05):
            then = time.time() + clock_ahead_s
            tmp = path.with_name(path.name + ".beat")
            tmp.write_text(json.dumps(dict(fields, heartbeat=then)))
            os.utime(tmp, (then, then))
            os.replace(tmp, path)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _this_process():
    """What a lock of this process records about it, read from /proc here (not with the module's helpers)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    with open("/proc/self/stat") as f:
        start_time = f.read().rpartition(")")[2].split()[19]
    return dict(boot_id=boot_id, pid_ns=os.readlink("/proc/self/ns/pid"), start_time=start_time)


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


# -- locks follow real locations ------------------------------------------------
def test_two_workdirs_whose_checkpoints_folders_link_to_one_folder_share_a_lock(tmp_path):
    store, a, b = tmp_path / "store", tmp_path / "a", tmp_path / "b"
    for workdir in (store, a, b):
        workdir.mkdir()
    (a / "checkpoints").symlink_to(store)
    (b / "checkpoints").symlink_to(store)
    first = lock_lib.WorkdirLock(str(a))
    first.acquire()
    try:
        assert json.loads((store / "LOCK").read_text())["run_id"] == first.run_id
        with pytest.raises(WorkdirError, match=rf"workdir {b} \(its checkpoints folder is {store}\) is in use by a "
                                               rf"run on host .* \(pid {os.getpid()}, .* in workdir {a}; wait"):
            lock_lib.WorkdirLock(str(b)).acquire()
        assert not (b / "LOCK").exists()  # the lock it had taken is given back
    finally:
        first.release()
    assert not (store / "LOCK").exists() and not (a / "LOCK").exists()
    with lock_lib.WorkdirLock(str(b)) as second:
        second.acquire()


def test_a_workdir_whose_checkpoints_folder_links_to_another_workdirs_shares_its_lock(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "checkpoints").mkdir(parents=True)
    b.mkdir()
    (b / "checkpoints").symlink_to(a / "checkpoints")
    for first, second in ((a, b), (b, a)):
        with lock_lib.WorkdirLock(str(first)) as held:
            held.acquire()
            with pytest.raises(WorkdirError, match=rf"workdir {second}.* is in use by a run on host .*"
                                                   rf"in workdir {first}; wait"):
                lock_lib.WorkdirLock(str(second)).acquire()
    assert sorted(os.listdir(a)) == ["checkpoints"] and sorted(os.listdir(b)) == ["checkpoints"]


def test_a_workdir_reached_through_a_link_is_the_same_workdir(tmp_path):
    """Spelled through a link, and through a link and `..`: `workdirs.checkpoint_dir` folds `..` before
    following links (abspath), so `sym/../run1` keeps its checkpoints in run1/checkpoints."""
    run1, deep = tmp_path / "run1", tmp_path / "deep" / "inner"
    (run1 / "checkpoints").mkdir(parents=True)
    deep.mkdir(parents=True)
    (tmp_path / "link").symlink_to(run1)
    (tmp_path / "sym").symlink_to(deep)
    dotted = f"{tmp_path}/sym/../run1"
    assert os.path.join(os.path.abspath(dotted), "checkpoints") == str(run1 / "checkpoints")
    with lock_lib.WorkdirLock(str(run1)) as held:
        held.acquire()
        for other in (str(tmp_path / "link"), dotted):
            with pytest.raises(WorkdirError, match=rf"pid {os.getpid()},"):
                lock_lib.WorkdirLock(other).acquire()


def test_a_lock_in_a_linked_checkpoints_folder_is_renewed_released_and_invisible_to_orbax(tmp_path):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    store, workdir = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    workdir.mkdir()
    (workdir / "checkpoints").symlink_to(store)
    held = lock_lib.WorkdirLock(str(workdir), heartbeat_s=0.1)
    held.acquire()
    try:
        first = json.loads((store / "LOCK").read_text())["heartbeat"]
        (store / "LOCK.mutex").write_text("")  # as if caught mid-renewal
        manager = ocp.CheckpointManager(str(workdir / "checkpoints"),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=1))
        for step in (1, 2):
            manager.save(step, args=ocp.args.StandardSave({"w": np.arange(3)}))
        manager.wait_until_finished()
        assert manager.all_steps() == [2] and ocp.CheckpointManager(str(store)).all_steps() == [2]
        (store / "LOCK.mutex").unlink()
        deadline = time.time() + 20
        while json.loads((store / "LOCK").read_text())["heartbeat"] == first:
            assert time.time() < deadline, "the heartbeat of the checkpoints folder's lock was never renewed"
            time.sleep(0.05)
    finally:
        held.release()
    assert sorted(os.listdir(store)) == ["2"] and not held.lost


# -- is the holder alive: PID namespaces, reused pids, reboots ---------------------
@needs_proc
def test_a_lock_left_in_another_pid_namespace_is_taken_over_once_its_heartbeat_stops(tmp_path, caplog):
    """A container restarted in place: the old run was pid 1 too, in another PID namespace."""
    here = dict(_this_process(), pid_ns="pid:[1]")
    _fake_lock(tmp_path, host=socket.gethostname(), pid=1, heartbeat_age=1, **here)
    start = time.time()
    with lock_lib.WorkdirLock(str(tmp_path)) as taker:
        taker.acquire()
        assert json.loads((tmp_path / "LOCK").read_text())["run_id"] == taker.run_id
    assert time.time() - start < 10
    assert "another PID namespace" in caplog.text and "did not advance" in caplog.text


@needs_proc
def test_a_live_lock_in_another_pid_namespace_refuses(tmp_path):
    here = dict(_this_process(), pid_ns="pid:[1]")
    path = _fake_lock(tmp_path, host=socket.gethostname(), pid=1, heartbeat_age=0, **here)
    with _beating(path), pytest.raises(WorkdirError, match=r"in use by a run on host .* \(pid 1, "):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()


@needs_proc
def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, caplog):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = dict(_this_process(), start_time="1")  # the recorded process started at boot, this one did not
        _fake_lock(tmp_path, host=socket.gethostname(), pid=other.pid, heartbeat_age=1, **here)
        with lock_lib.WorkdirLock(str(tmp_path)) as taker:
            taker.acquire()
    finally:
        other.kill()
        other.wait()
    assert f"pid {other.pid} now belongs to another process" in caplog.text


@needs_proc
def test_a_lock_naming_this_process_but_not_held_by_it_is_taken_over(tmp_path, caplog):
    _fake_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), heartbeat_age=1, **_this_process())
    with lock_lib.WorkdirLock(str(tmp_path)) as taker:
        taker.acquire()
    assert f"pid {os.getpid()} is this process, which does not hold it" in caplog.text


@needs_proc
def test_a_lock_from_before_a_reboot_is_taken_over(tmp_path, caplog):
    here = dict(_this_process(), boot_id="00000000-0000-0000-0000-000000000000")
    _fake_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), heartbeat_age=1, **here)
    with lock_lib.WorkdirLock(str(tmp_path)) as taker:
        taker.acquire()
    assert "this host has rebooted since" in caplog.text


# -- clock skew: watch instead of trusting another host's clock ------------------
def test_a_dead_holder_whose_clock_is_ahead_is_taken_over_after_watching(tmp_path, caplog):
    _fake_lock(tmp_path, host="node-17", pid=1, heartbeat_age=-3600)
    start = time.time()
    with lock_lib.WorkdirLock(str(tmp_path)) as taker:
        taker.acquire()
    assert time.time() - start < 10
    assert re.search(r"did not advance in \d s; its clock is 3[56]\d\d s ahead of this host's", caplog.text)


def test_a_live_holder_whose_clock_is_ahead_refuses_naming_the_difference(tmp_path):
    path = _fake_lock(tmp_path, host="node-17", pid=1, heartbeat_age=-3600)
    with _beating(path, clock_ahead_s=3600), pytest.raises(WorkdirError) as error:
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    message = str(error.value)
    assert re.search(r"last heartbeat 3[56]\d\d s in the future \(its clock is ahead\)\)", message), message
    assert re.search(r"; its clock is 3[56]\d\d s ahead of this host's; wait", message), message
    assert " 0 s ago" not in message and "\n" not in message


def test_a_live_holder_whose_clock_is_behind_is_not_taken_over(tmp_path):
    path = _fake_lock(tmp_path, host="node-17", pid=1, heartbeat_age=3600)
    behind = r"its clock is 3[56]\d\d s behind this host's; wait"
    with _beating(path, clock_ahead_s=-3600), pytest.raises(WorkdirError, match=behind):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert json.loads(path.read_text())["run_id"] == "other-run"


def test_describe_names_a_heartbeat_in_the_future(tmp_path):
    now = time.time()
    holder = lock_lib.Holder(host="node-17", pid=1, run_id="r", started=now, heartbeat=now + 90, lease_s=120)
    assert holder.describe(now).endswith("last heartbeat 90 s in the future (its clock is ahead))")
    assert lock_lib.Holder(**dict(vars(holder), heartbeat=now - 5)).describe(now).endswith("last heartbeat 5 s ago)")


# -- a lock file removed by hand, a lock taken over ---------------------------
def test_a_lock_file_removed_by_hand_is_written_again_and_the_run_keeps_the_workdir(tmp_path, caplog):
    held = lock_lib.WorkdirLock(str(tmp_path), heartbeat_s=0.1)
    held.acquire()
    try:
        written = json.loads((tmp_path / "LOCK").read_text())
        (tmp_path / "LOCK").unlink()
        assert held.still_held() and not held.lost and held.lost_to is None
        again = json.loads((tmp_path / "LOCK").read_text())
        assert (again["run_id"], again["started"]) == (written["run_id"], written["started"])
        (tmp_path / "LOCK").unlink()  # now the heartbeat finds it missing
        deadline = time.time() + 20
        while not (tmp_path / "LOCK").exists():
            assert time.time() < deadline, "the heartbeat never wrote the lock file again"
            time.sleep(0.05)
        time.sleep(0.3)
        assert held.renew() and held.still_held() and not held.lost
    finally:
        held.release()
    assert caplog.text.count("was removed while this run held it; written again") == 2
    assert not (tmp_path / "LOCK").exists()


def test_lost_to_names_the_run_that_took_the_workdir_over(tmp_path):
    holder = lock_lib.WorkdirLock(str(tmp_path), heartbeat_s=3600)  # beats by hand below
    holder.acquire()
    taker = lock_lib.WorkdirLock(str(tmp_path))
    taker.acquire(take_over=True)
    try:
        assert holder.lost_to is None
        assert not holder.still_held() and holder.lost
        assert holder.lost_to.run_id == taker.run_id and holder.lost_to.pid == os.getpid()
    finally:
        holder.release()
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


@pytest.mark.slow
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
        taken_over = r"another launch (\(a run on host .*\) )?took over workdir .* stopped without saving"
        with pytest.raises(WorkdirError, match=taken_over):
            trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    finally:
        trainer.make_train_step = make_real_step
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # nothing after the takeover
    assert json.loads((tmp_path / "LOCK").read_text())["run_id"] == taker.run_id  # the taker's lock untouched
    taker.release()
