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

from moco_jax.core import models, optim
from moco_jax.core import state as state_lib
from moco_jax.io import checkpoint
from moco_jax.training import metrics, trainer
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
    encoder = models.build_encoder(config)
    tx, _ = optim.make_optimizer(config, steps_per_epoch=10)
    return state_lib.create_train_state(jax.random.key(0), encoder, tx, (8, 8, 3), config.queue_size, config.embed_dim)


def _latest(workdir, config, num_shards=8):
    return checkpoint.restore_latest(str(workdir), _template(config), config, num_shards)


def _assert_states_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


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
    logged = {r["step"]: r["loss"] for r in metrics.read_jsonl(str(workdir))}
    for record in reference["history"][n:]:
        assert logged[record["step"]] == record["loss"], record["step"]


def test_resume_on_8_devices_from_a_4_device_checkpoint(tmp_path):
    overrides = dict(num_train_steps=3, log_every_steps=1, checkpoint_every_steps=3)
    # 3 steps of 16 keys into a queue of 32: the pointer is not at the start.
    _finish(_worker(4, tmp_path, overrides))
    config = tiny_config(**overrides)
    saved = checkpoint.restore_latest(str(tmp_path), _template(config), config, num_shards=4)
    assert int(saved.queue_ptr) == (3 * 4) % 8  # 4 keys per device per step, 8-row shards
    fifo = checkpoint.queue_in_fifo_order(np.asarray(saved.queue), int(saved.queue_ptr), 4, 4)

    restored = _latest(tmp_path, config, num_shards=8)
    assert int(restored.queue_ptr) == 0
    rows = lambda q: {tuple(r) for r in np.asarray(q)}  # noqa: E731
    assert rows(restored.queue) == rows(saved.queue)
    # The oldest global batch is the next one to be replaced: FIFO order kept.
    np.testing.assert_array_equal(checkpoint.queue_in_fifo_order(np.asarray(restored.queue), 0, 8, 2), fifo)

    # Training on 8 devices continues from it: one step replaces exactly the oldest batch.
    config.num_train_steps = 4
    trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    after = _latest(tmp_path, config, num_shards=8)
    assert int(after.step) == 4 and int(after.queue_ptr) == 2
    assert rows(after.queue) >= rows(fifo[16:]) and not rows(after.queue) & rows(fifo[:16])


def test_reshard_queue_keeps_fifo_order():
    k, c, batch = 24, 3, 6
    rng = np.random.default_rng(0)
    queue = rng.normal(size=(k, c))
    for old, new in [(3, 6), (6, 2), (2, 3)]:
        for ptr in range(0, k // old, batch // old):
            fifo = checkpoint.queue_in_fifo_order(queue, ptr, old, batch // old)
            new_queue, new_ptr = checkpoint.reshard_queue(queue, ptr, old, new, batch)
            assert new_ptr == 0
            np.testing.assert_array_equal(checkpoint.queue_in_fifo_order(new_queue, 0, new, batch // new), fifo)
    same, ptr = checkpoint.reshard_queue(queue, 2, 3, 3, batch)
    assert same is queue and ptr == 2
    # Same devices, new global batch (6 -> 12): re-laid out, age order kept.
    fifo = checkpoint.queue_in_fifo_order(queue, 4, 3, 2)
    new_queue, ptr = checkpoint.reshard_queue(queue, 4, 3, 3, 12, old_global_batch=6)
    assert ptr == 0
    np.testing.assert_array_equal(checkpoint.queue_in_fifo_order(new_queue, 0, 3, 4), fifo)
    with pytest.raises(ValueError, match="batch_size"):
        checkpoint.reshard_queue(queue, 0, 3, 4, batch)


def _train(workdir, **overrides):
    config = tiny_config(**overrides)
    trainer.train_and_evaluate(config, workdir=str(workdir), show_progress=False)
    return config


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
    # When no checkpoint is readable any more, relaunching refuses to start over.
    steps = [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert sorted(steps, key=int) == ["2", "4", "5"]
    for step in steps:
        for root, _, files in os.walk(tmp_path / "checkpoints" / step):
            for name in files:
                open(os.path.join(root, name), "w").close()
    with pytest.raises(RuntimeError, match="no checkpoint .* is readable"):
        _latest(tmp_path, config)


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
