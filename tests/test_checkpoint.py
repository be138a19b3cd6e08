"""Checkpoints: exact resume after SIGKILL, resume on another device count,
and the failure modes a relaunched job on a shared cluster runs into."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moco_jax.core import optim
from moco_jax.core import state as state_lib
from moco_jax.io import checkpoint
from moco_jax.training import metrics, trainer
from moco_jax import methods
from tiny import tiny_config

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
TIMEOUT = 240


def _worker(num_devices, workdir, overrides, hang_at=0):
    import json

    args = [sys.executable, WORKER, str(num_devices), str(workdir), json.dumps(overrides)]
    return subprocess.Popen(args + ([str(hang_at)] if hang_at else []), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc):
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out[-3000:]
    return out


def _template(config):
    encoder = methods.build_encoder(config)
    tx, _ = optim.make_optimizer(config, steps_per_epoch=10)
    return state_lib.create_train_state(jax.random.key(0), encoder, tx, (8, 8, 3), config.queue_size, config.embed_dim)


def _latest(workdir, config, num_shards=8):
    return checkpoint.restore_latest(str(workdir), _template(config), config, num_shards)


def _assert_states_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigkill_and_relaunch_continues_bit_exactly(tmp_path):
    n, m = 4, 3
    overrides = dict(num_train_steps=n + m, log_every_steps=1, checkpoint_every_steps=n)
    config = tiny_config(**overrides)
    reference = trainer.train_and_evaluate(config, workdir=str(tmp_path / "ref"), show_progress=False)

    workdir = tmp_path / "preempted"
    proc = _worker(8, workdir, overrides, hang_at=n + 2)
    deadline = time.time() + TIMEOUT
    while not (workdir / "checkpoints" / str(n) / "_CHECKPOINT_METADATA").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    time.sleep(1.0)  # let it run into the hang past step n+1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(n)]

    assert "finished" in _finish(_worker(8, workdir, overrides))
    resumed, expected = _latest(workdir, config), _latest(tmp_path / "ref", config)
    assert int(resumed.step) == n + m
    _assert_states_equal(resumed, expected)
    logged = {r["step"]: r["loss"] for r in metrics.read_jsonl(str(workdir)) if "loss" in r}
    for record in reference["history"][n:]:
        assert logged[record["step"]] == record["loss"], record["step"]


@pytest.mark.slow
def test_resume_on_8_devices_from_a_4_device_checkpoint(tmp_path, caplog):
    overrides = dict(num_train_steps=3, log_every_steps=1, checkpoint_every_steps=3)
    # 3 steps of 16 keys into a queue of 32: the pointer is not at the start.
    _finish(_worker(4, tmp_path, overrides))
    config = tiny_config(**overrides)
    saved = checkpoint.restore_latest(str(tmp_path), _template(config), config, num_shards=4)
    assert int(saved.queue_ptr) == (3 * 4) % 8  # 4 keys per device per step, 8-row shards
    fifo = state_lib.queue_in_fifo_order(np.asarray(saved.queue), int(saved.queue_ptr), 4, 4)

    restored = _latest(tmp_path, config, num_shards=8)
    assert int(restored.queue_ptr) == 0
    rows = lambda q: {tuple(r) for r in np.asarray(q)}  # noqa: E731
    assert rows(restored.queue) == rows(saved.queue)
    # The oldest global batch is the next one to be replaced: FIFO order kept.
    np.testing.assert_array_equal(state_lib.queue_in_fifo_order(np.asarray(restored.queue), 0, 8, 2), fifo)

    # Training on 8 devices continues from it: one step replaces exactly the oldest batch.
    config.num_train_steps = 4
    trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    assert "resuming checkpoint 3 with a changed config: num_train_steps: 3 -> 4" in caplog.text
    after = _latest(tmp_path, config, num_shards=8)
    assert int(after.step) == 4 and int(after.queue_ptr) == 2
    assert rows(after.queue) >= rows(fifo[16:]) and not rows(after.queue) & rows(fifo[:16])


def test_reshard_queue_keeps_fifo_order():
    k, c, batch = 24, 3, 6
    rng = np.random.default_rng(0)
    queue = rng.normal(size=(k, c))
    for old, new in [(3, 6), (6, 2), (2, 3)]:
        for ptr in range(0, k // old, batch // old):
            fifo = state_lib.queue_in_fifo_order(queue, ptr, old, batch // old)
            new_queue, new_ptr = state_lib.reshard_queue(queue, ptr, old, new, batch)
            assert new_ptr == 0
            np.testing.assert_array_equal(state_lib.queue_in_fifo_order(new_queue, 0, new, batch // new), fifo)
    same, ptr = state_lib.reshard_queue(queue, 2, 3, 3, batch)
    assert same is queue and ptr == 2
    # Same devices, new global batch (6 -> 12): re-laid out, age order kept.
    fifo = state_lib.queue_in_fifo_order(queue, 4, 3, 2)
    new_queue, ptr = state_lib.reshard_queue(queue, 4, 3, 3, 12, old_global_batch=6)
    assert ptr == 0
    np.testing.assert_array_equal(state_lib.queue_in_fifo_order(new_queue, 0, 3, 4), fifo)
    with pytest.raises(ValueError, match="batch_size"):
        state_lib.reshard_queue(queue, 0, 3, 4, batch)


def _train(workdir, **overrides):
    config = tiny_config(**overrides)
    trainer.train_and_evaluate(config, workdir=str(workdir), show_progress=False)
    return config


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    config = _train(tmp_path, num_train_steps=4, checkpoint_every_steps=2)
    good = _latest(tmp_path, tiny_config(num_train_steps=4))
    assert int(good.step) == 4
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(f.name) // 3))
    restored = _latest(tmp_path, config)
    assert int(restored.step) == 2
    assert "checkpoint 4" in caplog.text
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir()
    # And training resumes from step 2.
    config.num_train_steps = 5
    trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    assert int(_latest(tmp_path, config).step) == 5
    # When no checkpoint is usable any more, every relaunch refuses to start
    # over (setting them aside must not turn the next relaunch into step 0)...
    steps = [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert sorted(steps, key=int) == ["2", "4", "5"]
    for step in steps:
        for root, _, files in os.walk(tmp_path / "checkpoints" / step):
            for name in files:
                open(os.path.join(root, name), "w").close()
    for _ in range(2):
        with pytest.raises(checkpoint.NoUsableCheckpointError, match="has held checkpoints but none is usable.*"
                                                                     "--fresh_start"):
            trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    # ...until a fresh start is asked for: then the earlier run's files move
    # to replaced-<time>/ and training starts at step 0.
    result = trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False, fresh_start=True)
    assert [r["step"] for r in result["history"]][0] == 2  # logged every 2 steps from step 0
    (replaced,) = [d for d in os.listdir(tmp_path) if d.startswith("replaced-")]
    assert sorted(os.listdir(tmp_path / replaced / "checkpoints")) == ["2.corrupt", "4.corrupt", "4.corrupt1",
                                                                       "5.corrupt"]
    assert (tmp_path / replaced / metrics.JSONL_NAME).exists()
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path)) if "loss" in r] == [2, 4, 5]
    assert int(_latest(tmp_path, config).step) == 5


# ---------------------------------------------------------------------------
# Damaged checkpoints: each kind of damage is found, set aside in one warning
# line, and the previous checkpoint is used.
# ---------------------------------------------------------------------------
def _largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def _flip_bit(path, at=0.5):
    with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.seek(int(size * at))
        byte = f.read(1)
        f.seek(int(size * at))
        f.write(bytes([byte[0] ^ 0x08]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _edit_meta(path):
    """A plausible edit no JSON parser notices: the saved batch size."""
    text = open(path).read()
    assert '"batch_size": 16' in text
    open(path, "w").write(text.replace('"batch_size": 16', '"batch_size": 32', 1))


def _drop_checksums(path):
    import json  # noqa: PLC0415

    meta = json.load(open(path))
    del meta["checksums"]
    json.dump(meta, open(path, "w"))


DAMAGE = {
    "array_data_bit_flip": lambda d: _flip_bit(_largest_file(d / "state")),
    "array_data_truncated": lambda d: _truncate(_largest_file(d / "state")),
    "array_metadata_removed": lambda d: os.remove(d / "state" / "_METADATA"),
    "meta_removed": lambda d: os.remove(d / "meta" / "metadata"),
    "meta_edited": lambda d: _edit_meta(d / "meta" / "metadata"),
    "checksums_removed": lambda d: _drop_checksums(d / "meta" / "metadata"),
    "every_file_truncated": lambda d: [_truncate(os.path.join(r, n)) for r, _, ns in os.walk(d) for n in ns],
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_checkpoints")
    config = _train(workdir, num_train_steps=4, checkpoint_every_steps=2)
    return workdir, config, _latest(workdir, config)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_set_aside_with_one_warning(two_checkpoints, tmp_path, caplog, damage):
    import shutil  # noqa: PLC0415

    source, config, _ = two_checkpoints
    workdir = tmp_path / "workdir"
    shutil.copytree(source, workdir)
    DAMAGE[damage](workdir / "checkpoints" / "4")
    restored = _latest(workdir, config)
    assert int(restored.step) == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "checkpoint 4" in warnings[0].getMessage() and "set aside as 4.corrupt" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4.corrupt"]


def test_checkpoint_without_orbax_bookkeeping_but_verified_arrays_is_used(two_checkpoints, tmp_path, caplog):
    """orbax's _CHECKPOINT_METADATA (handler names, timestamps) is not needed
    to read the arrays back; the checksums prove they are intact, so the
    checkpoint is used, silently, rather than thrown away."""
    import shutil  # noqa: PLC0415

    source, config, newest = two_checkpoints
    workdir = tmp_path / "workdir"
    shutil.copytree(source, workdir)
    os.remove(workdir / "checkpoints" / "4" / "_CHECKPOINT_METADATA")
    restored = _latest(workdir, config)
    _assert_states_equal(restored, newest)
    assert not [r for r in caplog.records if r.levelname != "INFO"]


@pytest.mark.slow
def test_non_finite_values_in_a_checkpoint_name_the_checkpoint(tmp_path, caplog):
    """A checkpoint that is intact but holds NaN (written by other code: the
    trainer refuses to save one) is set aside naming the array."""
    config = _train(tmp_path, num_train_steps=2)
    good = _latest(tmp_path, config)
    poisoned = good.replace(step=np.asarray(3, np.int32),
                            params=jax.tree.map(lambda p: np.full_like(p, np.nan), good.params))
    manager = checkpoint.make_manager(str(tmp_path))
    checkpoint.save(manager, poisoned, config, num_queue_shards=8)
    checkpoint.finish(manager)
    assert int(_latest(tmp_path, config).step) == 2
    assert "checkpoint 3" in caplog.text and "non-finite values (in params/" in caplog.text


def test_export_reads_only_verified_checkpoints_and_never_creates_folders(two_checkpoints, tmp_path, caplog):
    import shutil  # noqa: PLC0415

    from moco_jax.core.errors import NotFoundError  # noqa: PLC0415

    source, _, _ = two_checkpoints
    with pytest.raises(NotFoundError, match="not a pretraining workdir"):
        checkpoint.load_encoder_variables(str(tmp_path))
    assert os.listdir(tmp_path) == []  # no checkpoints/ folder appeared
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    _flip_bit(_largest_file(workdir / "checkpoints" / "4" / "state"))
    _, variables = checkpoint.load_encoder_variables(str(workdir))
    manager = checkpoint.make_manager(str(source))
    step_2, _ = checkpoint.read_verified(manager, 2)
    manager.close()
    _assert_states_equal(variables["params"], step_2["params"])  # the previous, intact checkpoint
    assert "checkpoint 4" in caplog.text
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # read-only: nothing moved


@pytest.mark.slow
def test_relaunch_with_nothing_left_to_train_keeps_the_final_loss(tmp_path):
    import json  # noqa: PLC0415

    _train(tmp_path, num_train_steps=2)
    first = json.load(open(tmp_path / metrics.FINAL_NAME))
    _train(tmp_path, num_train_steps=2)
    again = json.load(open(tmp_path / metrics.FINAL_NAME))
    assert {k: again[k] for k in ("loss", "top1", "top5", "step")} == {k: first[k] for k in ("loss", "top1", "top5",
                                                                                             "step")}


@pytest.mark.slow
def test_checkpoint_of_another_model_config_is_refused_naming_the_fields(tmp_path):
    _train(tmp_path, num_train_steps=2)
    config = tiny_config(num_train_steps=4, embed_dim=16)
    config.model.width = 8
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.width.*embed_dim|embed_dim.*model\.width"):
        trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="a_file/workdir.*not writable"):
        trainer.train_and_evaluate(tiny_config(), workdir=str(blocker / "workdir"), show_progress=False)


@pytest.mark.parametrize("log_every, error_step, poisoned", [(1, 3, "loss"), (10, 4, "loss"), (10, 4, "grad_norm")])
@pytest.mark.slow
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, log_every, error_step, poisoned):
    """NaN from step 3 on. Logged every step: caught at step 3. Never logged
    before the end: caught by the check before the step-4 checkpoint. A NaN
    gradient with a finite loss (the loss is the old parameters') too."""
    make_real_step = trainer.make_train_step

    def make_poisoned_step(*args):
        real = make_real_step(*args)

        def step(p_state, batch):
            p_state, step_metrics = real(p_state, batch)
            if int(p_state.step.addressable_shards[0].data[0]) >= 3:
                p_state = p_state.replace(params=jax.tree.map(lambda p: p * np.nan, p_state.params))
                step_metrics = dict(step_metrics, **{poisoned: step_metrics[poisoned] * np.nan})
            return p_state, step_metrics

        return step

    monkeypatch.setattr(trainer, "make_train_step", make_poisoned_step)
    config = tiny_config(num_train_steps=6, checkpoint_every_steps=2, log_every_steps=log_every)
    with pytest.raises(FloatingPointError, match=f"step {error_step}"):
        trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    state = _latest(tmp_path, config)
    assert int(state.step) == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_train_py_on_a_workdir_whose_checkpoints_are_all_damaged_says_so_in_one_line(two_checkpoints, tmp_path):
    """The console of the relaunch: one warning per checkpoint set aside and
    the error, with no traceback (orbax's and asyncio's included)."""
    import shutil  # noqa: PLC0415

    from test_workdir_lock import REPO, TINY_FLAGS  # noqa: PLC0415

    source, _, _ = two_checkpoints
    workdir = tmp_path / "workdir"
    shutil.copytree(source, workdir)
    _flip_bit(_largest_file(workdir / "checkpoints" / "4" / "state"))
    DAMAGE["every_file_truncated"](workdir / "checkpoints" / "2")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", *TINY_FLAGS], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr and "Event loop" not in run.stderr, run.stderr[-3000:]
    assert [line for line in lines if "is damaged" in line and "set aside" in line][-2:] == [
        line for line in lines if "is damaged" in line]
    assert len([line for line in lines if "is damaged" in line]) == 2
    assert lines[-1].startswith(f"error: workdir {workdir} has held checkpoints but none is usable")
    assert len(lines) < 12, run.stderr


# ---------------------------------------------------------------------------
# Set aside only what is damaged; bring back what was set aside by mistake.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_checkpoint_that_verifies_but_does_not_fit_the_config_is_refused_and_nothing_moves(tmp_path):
    """A field that changes the optimizer state's layout (conv_grad_scale adds
    a level) is not one of MODEL_FIELDS: the checkpoint verifies, so it is
    refused in one line naming what differs, and stays where it is."""
    _train(tmp_path, num_train_steps=4, checkpoint_every_steps=2)
    changed = tiny_config(num_train_steps=6, checkpoint_every_steps=2, conv_grad_scale="pytorch_init")
    for _ in range(2):
        with pytest.raises(checkpoint.CheckpointMismatchError) as error:
            trainer.train_and_evaluate(changed, workdir=str(tmp_path), show_progress=False)
        message = str(error.value)
        assert "checkpoint 4" in message and "is intact but does not fit" in message and "opt_state" in message
        assert "conv_grad_scale: 'none' -> 'pytorch_init'" in message and "Nothing was moved" in message
        assert "\n" not in message
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    # The config it was written with still resumes it.
    config = tiny_config(num_train_steps=5, checkpoint_every_steps=2)
    result = trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    assert [h["step"] for h in result["history"]] == [5]


@pytest.mark.slow
def test_bring_back_returns_set_aside_checkpoints_that_verify_and_leaves_damaged_ones(two_checkpoints, tmp_path):
    import shutil  # noqa: PLC0415

    from test_workdir_lock import REPO  # noqa: PLC0415

    source, config, newest = two_checkpoints
    workdir = tmp_path / "workdir"
    shutil.copytree(source, workdir)
    folder = workdir / "checkpoints"
    os.rename(folder / "4", folder / "4.corrupt")  # a false alarm
    _flip_bit(_largest_file(folder / "2" / "state"))
    os.rename(folder / "2", folder / "2.corrupt")  # really damaged
    run = lambda *flags: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "moco_jax.checkpoints", f"--workdir={workdir}", *flags], cwd=REPO,
        capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    listing = run()
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert listing.stdout.splitlines() == ["4.corrupt: set aside; ok",
                                           listing.stdout.splitlines()[1]]
    # A flipped bit in a compressed chunk fails either the checksum or the decompression (the chunk layout
    # of the OCDBT file varies from run to run): damaged both ways.
    assert listing.stdout.splitlines()[1].startswith(("2.corrupt: set aside; damaged: 1 of",
                                                      "2.corrupt: set aside; damaged: its arrays cannot be read"))
    brought = run("--bring_back")
    assert brought.returncode == 0, brought.stderr[-2000:]
    assert "4.corrupt: verifies: brought back as checkpoint 4" in brought.stdout
    assert "2.corrupt: left as it is (damaged:" in brought.stdout
    assert sorted(os.listdir(folder)) == ["2.corrupt", "4"] and not (workdir / "LOCK").exists()
    _assert_states_equal(_latest(workdir, config), newest)


# ---------------------------------------------------------------------------
# Paths orbax cannot use are refused at start-up; what it cannot read back is
# caught right after the save.
# ---------------------------------------------------------------------------
def test_a_workdir_path_with_glob_characters_is_refused_at_start_up(tmp_path):
    workdir = tmp_path / "array_job[1]"
    with pytest.raises(OSError, match=r"contains \[ \]: orbax-checkpoint finds its files with a glob"):
        trainer.train_and_evaluate(tiny_config(), workdir=str(workdir), show_progress=False)
    assert not (workdir / metrics.JSONL_NAME).exists()


def test_a_workdir_path_too_long_for_checkpoints_is_refused_at_start_up(tmp_path):
    parts, length = [], len(str(tmp_path))
    while length < 3995:
        part = "d" * min(200, 3995 - length - 1)
        parts.append(part)
        length += len(part) + 1
    workdir = os.path.join(str(tmp_path), *parts)
    assert len(workdir) == 3995
    with pytest.raises(OSError, match="path is 4007 characters long and checkpoints add up to"):
        trainer.train_and_evaluate(tiny_config(), workdir=workdir, show_progress=False)


def test_a_checkpoint_that_does_not_read_back_stops_the_run_at_once(tmp_path):
    """Orbax writes into a folder whose name has a glob character but cannot
    read it back (start-up refuses such a workdir; here the writer is used
    directly): the read-back right after the save finds it."""
    from moco_jax.io.saver import CheckpointWriter  # noqa: PLC0415

    config = tiny_config()
    workdir = tmp_path / "job[1]"
    writer = CheckpointWriter(str(workdir))
    writer.save(_template(config), config, num_queue_shards=8)
    failure = writer.poll(wait=True)
    assert failure is not None and "checkpoint 0 was written to" in str(failure)
    assert "does not read back as saved" in str(failure) and "training stopped" in str(failure)
    with pytest.raises(OSError, match="does not read back"):
        writer.finish()


# ---------------------------------------------------------------------------
# Checkpoints of moco_jax 0.2 (tests/data/checkpoints_0.2, written by
# tests/data/checkpoints_0.2/make.py at commit caa3072).
# ---------------------------------------------------------------------------
LEGACY = os.path.join(os.path.dirname(__file__), "data", "checkpoints_0.2")


def _legacy_config(name):
    overrides = dict(num_train_steps=2, checkpoint_every_steps=2, batch_size=4, eval_batch_size=64,
                     knn_max_train_images=64)
    if name == "moco_v2_resnet":
        return tiny_config(queue_size=8, **overrides)
    config = tiny_config(method="moco_v3", queue_size=0, shuffle_bn=False, optimizer="lars",
                         weight_decay_mask="no_bn_bias", temperature=1.0, momentum_schedule="cosine",
                         augmentation="cifar_v3", **overrides)
    config.model.sync_bn, config.model.mlp_dim = True, 16
    return config


@pytest.mark.parametrize("name", ["moco_v2_resnet", "moco_v3_resnet"])
def test_checkpoints_written_by_moco_jax_0_2_stay_readable(tmp_path, caplog, name):
    import shutil  # noqa: PLC0415

    workdir = tmp_path / name
    shutil.copytree(os.path.join(LEGACY, name), workdir)
    config = _legacy_config(name)
    restored = checkpoint.restore_latest(str(workdir), _template(config), config, num_shards=2)
    assert int(restored.step) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if name == "moco_v3_resnet":
        assert restored.queue is None
        assert len(warnings) == 1 and "written by moco_jax 0.2" in warnings[0]
        assert "queue and queue_ptr" in warnings[0] and "every array is verified" in warnings[0]
    else:  # shuffle_mode's default is now auto (the all-to-all where it applies): said, as any changed field
        assert warnings == ["resuming checkpoint 2 with a changed config: shuffle_mode: 'all_gather' -> 'auto'"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # nothing set aside
    _, variables = checkpoint.load_encoder_variables(str(workdir))
    _assert_states_equal(variables["params"], restored.params)


@pytest.mark.slow
def test_a_resume_warns_when_the_dataset_size_or_the_learning_rate_at_the_resume_step_changed(tmp_path, caplog):
    _train(tmp_path, num_train_steps=4, checkpoint_every_steps=4, train_subset=800, log_every_steps=1)
    caplog.clear()
    _train(tmp_path, num_train_steps=8, checkpoint_every_steps=4, train_subset=640, log_every_steps=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    size = [w for w in warnings if "training images" in w]
    assert len(size) == 1 and "written with 800 training images and there are 640 now" in size[0]
    assert "an epoch is now 40 steps (was 50)" in size[0]
    lr = [w for w in warnings if "learning rate" in w]
    assert len(lr) == 1 and "the learning rate of step 5, the first after checkpoint 4, changes from" in lr[0]
    resumed = [r for r in metrics.read_jsonl(str(tmp_path)) if "learning_rate" in r and r["step"] == 5]
    assert f"changes from 0 (the schedule of the run that wrote it) to {resumed[0]['learning_rate']:.6g}" in lr[0]
