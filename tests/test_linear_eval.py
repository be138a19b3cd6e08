"""Linear evaluation: the fast features mode, the pmap-ed reference protocol,
resume, a SIGTERM mid-probe, cached features read back by a new process."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import linear_cifar10
from moco_jax import pretrained
from moco_jax.core import image_ops
from moco_jax.eval import linear as linear_eval
from moco_jax.io import checkpoint
from moco_jax.training import probe
from test_pretrained import random_variables, tiny_pretraining
from tiny import tiny_config


def linear_config(**overrides):
    config = linear_cifar10.get_config()
    config.update(overrides)
    return config


@pytest.mark.slow
def test_linear_probe_of_a_pretraining_workdir():
    """Features mode, full reference schedule (100 epochs, lr 30, drops at 60
    and 80) on the digits, the encoder read from a pretraining workdir.

    Not asserted: that it beats the random-init encoder's probe. Random
    convolutional features are already good for digits: the gain after 100 MoCo
    steps was +1.1 to +7.8 points on 359 test digits depending on the seed and
    the machine (one CI run: 72.1% vs 71.0%), noise for a test. That MoCo
    learned is asserted where the gain is large, on the kNN monitor
    (test_knn_eval.py: 43% -> 67%)."""
    _, workdir, _ = tiny_pretraining()
    config = linear_config(pretrained=workdir, mode="features", batch_size=64)
    trained = probe.evaluate(config)
    # Seen: 72-78% top-1 (chance: 10%).
    assert trained["top1"] > 0.6, trained["top1"]
    assert trained["top5"] >= trained["top1"]
    assert trained["history"][-1]["step"] == 100 * (1438 // 64)  # 100 epochs


@pytest.mark.slow
def test_full_protocol_resumes_exactly(tmp_path):
    """8 devices; a run stopped after 4 steps and relaunched to 8 ends where an
    uninterrupted 8-step run does (same data order, crops and updates)."""
    encoder = pretrained.Encoder(tiny_config(), random_variables(tiny_config()))
    config = linear_config(batch_size=16, learning_rate=0.5, log_every_steps=2, checkpoint_every_steps=2,
                           eval_batch_size=128)
    straight = probe.evaluate(linear_config(**{**config, "num_train_steps": 8}), str(tmp_path / "a"), encoder)
    probe.evaluate(linear_config(**{**config, "num_train_steps": 4}), str(tmp_path / "b"), encoder)
    resumed = probe.evaluate(linear_config(**{**config, "num_train_steps": 8}), str(tmp_path / "b"), encoder)

    assert [h["step"] for h in resumed["history"]] == [6, 8]  # only the steps after the checkpoint ran
    assert {"6", "8"} <= set(os.listdir(tmp_path / "b" / "checkpoints"))
    for a, b in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(a, b)
    assert straight["top1"] == resumed["top1"] and 0.0 <= straight["top1"] <= straight["top5"] <= 1.0
    assert straight["history"][-1]["loss"] > 0


@pytest.mark.slow
def test_classifier_checkpoints_fall_back_past_a_corrupt_one_and_refuse_another_encoder(tmp_path, caplog):
    """The probe's checkpoints go through moco_jax.io.checkpoint: a corrupt
    newest one is moved aside and the previous one resumed; a workdir of
    another encoder is refused, naming the field."""
    encoder = pretrained.Encoder(tiny_config(), random_variables(tiny_config()))
    config = linear_config(batch_size=16, learning_rate=0.5, log_every_steps=2, checkpoint_every_steps=2,
                           eval_batch_size=128, num_train_steps=4)
    probe.evaluate(config, str(tmp_path), encoder)
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 3)
    resumed = probe.evaluate(linear_config(**{**config, "num_train_steps": 6}), str(tmp_path), encoder)
    assert [h["step"] for h in resumed["history"]] == [4, 6]  # resumed from step 2
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir() and "checkpoint 4" in caplog.text
    with pytest.raises(checkpoint.CheckpointMismatchError, match="pretrained"):
        probe.evaluate(linear_config(**{**config, "pretrained": "/elsewhere", "num_train_steps": 8}),
                             str(tmp_path), encoder)


def test_eval_view_is_resize_and_center_crop():
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = images / 255.0
    mean, std = image_ops.CIFAR10_MEAN, image_ops.CIFAR10_STD
    # fraction 1: the whole image, unchanged but normalised.
    np.testing.assert_allclose(linear_eval.eval_view(images, 32, 1.0, mean, std),
                               (x - mean) / np.asarray(std), atol=1e-5)
    # Resize(32) + CenterCrop(28) keeps the central 28x28 pixels exactly.
    np.testing.assert_allclose(linear_eval.eval_view(images, 28, 0.875, mean, std),
                               (x[:, 2:30, 2:30] - mean) / np.asarray(std), atol=1e-5)


def test_correct_counts_are_top1_and_top5_hits_of_the_valid_rows():
    logits = np.tile(np.arange(7.0), (4, 1))  # class 6 first, then 5, 4, 3, 2
    labels = np.array([6, 2, 1, 6])
    valid = np.array([True, True, True, False])
    np.testing.assert_array_equal(linear_eval.correct_counts(logits, labels, valid), [1, 2, 3])
    assert linear_eval.accuracies(np.array([1.0, 2.0, 4.0])) == {"top1": 0.25, "top5": 0.5}


def test_configs_default_to_the_reference_protocol():
    from configs import linear_imagenet

    for config in (linear_cifar10.get_config(), linear_imagenet.get_config()):
        assert (config.mode, config.learning_rate, config.batch_size, config.sgd_momentum) == ("full", 30.0, 256, 0.9)
        assert (config.weight_decay, config.num_epochs, config.lr_schedule) == (0.0, 100, "step")
        assert tuple(config.lr_drop_epochs) == (60, 80) and tuple(config.train_crop_scale) == (0.08, 1.0)
        assert config.eval_crop_fraction == 0.875
    imagenet = linear_imagenet.get_config()
    assert imagenet.crop_size == 224 and int(224 / imagenet.eval_crop_fraction) == 256  # Resize(256) + CenterCrop(224)


def test_the_v3_config_is_moco_v3s_protocol():
    from configs import linear_imagenet_v3

    config = linear_imagenet_v3.get_config()
    linear_eval.validate_linear_config(config)
    assert (config.batch_size, config.num_epochs, config.lr_schedule, config.learning_rate) == (1024, 90, "cosine", 3.0)
    assert (config.weight_decay, config.sgd_momentum, config.warmup_epochs) == (0.0, 0.9, 0.0)


def _sigterm_during_step(monkeypatch, at: int):
    """Make the probe send this process SIGTERM while it runs its step `at`
    (counted from the first step of each launch); returns the real step."""
    real, calls = probe.Probe.step, []

    def step_with_a_sigterm(self, p_state, batch):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, p_state, batch)

    monkeypatch.setattr(probe.Probe, "step", step_with_a_sigterm)
    return real


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "features"])
def test_a_sigterm_mid_probe_saves_and_the_relaunch_ends_bit_exact(tmp_path, monkeypatch, mode):
    """SIGTERM during step 3 of 8: the probe saves step 3 and returns
    preempted; the relaunch resumes there and ends with the parameters and
    accuracies of an uninterrupted probe."""
    encoder = pretrained.Encoder(tiny_config(), random_variables(tiny_config()))
    config = linear_config(batch_size=16, learning_rate=0.5, log_every_steps=2, checkpoint_every_steps=100,
                           eval_batch_size=128, num_train_steps=8, mode=mode)
    straight = probe.evaluate(config, str(tmp_path / "a"), encoder)
    real = _sigterm_during_step(monkeypatch, 3)
    stopped = probe.evaluate(config, str(tmp_path / "b"), encoder)
    monkeypatch.setattr(probe.Probe, "step", real)
    assert stopped["preempted"] == 3 and stopped["signal"] == signal.SIGTERM and "top1" not in stopped
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["3"]
    resumed = probe.evaluate(config, str(tmp_path / "b"), encoder)
    assert [h["step"] for h in resumed["history"]] == [4, 6, 8]
    for a, b in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(a, b)
    assert (straight["top1"], straight["top5"]) == (resumed["top1"], resumed["top5"])


@pytest.mark.slow
def test_cached_features_are_read_back_by_a_new_process(tmp_path):
    """Features mode writes its features into the workdir; linear_eval in a
    new process, given a copy of them in another workdir (another host on a
    shared disk), reuses them, says so, and scores what this process did."""
    import shutil

    from moco_jax.io import formats

    encoder = pretrained.Encoder(tiny_config(), random_variables(tiny_config()))
    path = str(tmp_path / "enc.msgpack")
    formats.write_flax(path, encoder.config, encoder.variables)
    flags = {"mode": "features", "batch_size": 16, "learning_rate": 0.5, "eval_batch_size": 128,
             "num_train_steps": 6, "log_every_steps": 3}
    first = probe.evaluate(linear_config(pretrained=path, **flags), str(tmp_path / "w"), pretrained.load(path))
    assert sorted(os.listdir(tmp_path / "w" / "features")) == ["test", "train"]
    shutil.copytree(tmp_path / "w" / "features", tmp_path / "v" / "features")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-m", "moco_jax.linear_eval", f"--pretrained={path}",
                          *[f"--config.{k}={v}" for k, v in flags.items()], f"--workdir={tmp_path / 'v'}"],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("reused") == 2 and "extracted" not in out.stderr, out.stderr[-2000:]
    assert f"top-1 {first['top1']:.2%}" in out.stdout and f"top-5 {first['top5']:.2%}" in out.stdout


@pytest.mark.slow
def test_linear_eval_stopped_by_sigterm_exits_0_and_says_how_to_resume(tmp_path, monkeypatch, capfd):
    """The program: SIGTERM during step 3 saves checkpoint 3, one line says
    so, the exit status is 0 (a scheduler requeues); the same command then
    resumes and finishes."""
    from moco_jax.io import formats
    from test_cli_errors import run_in_process

    encoder = pretrained.Encoder(tiny_config(), random_variables(tiny_config()))
    path = str(tmp_path / "enc.msgpack")
    formats.write_flax(path, encoder.config, encoder.variables)
    args = [f"--pretrained={path}", f"--workdir={tmp_path / 'w'}", "--config.batch_size=16",
            "--config.num_train_steps=6", "--config.eval_batch_size=128", "--config.learning_rate=0.5"]
    real = _sigterm_during_step(monkeypatch, 3)
    assert run_in_process("linear_eval", args) == 0
    out, _ = capfd.readouterr()
    assert "stopped by SIGTERM after step 3: checkpoint 3 is saved" in out and "relaunch the same command" in out
    monkeypatch.setattr(probe.Probe, "step", real)
    assert run_in_process("linear_eval", args) == 0
    out, _ = capfd.readouterr()
    assert "linear eval (full)" in out and "top-1" in out
