"""Linear evaluation: the fast features mode, the pmap-ed reference protocol, resume."""

import os

import jax
import numpy as np
import pytest

from configs import linear_cifar10
from moco_jax import pretrained
from moco_jax.core import image_ops
from moco_jax.eval import linear as linear_eval
from moco_jax.io import checkpoint
from test_pretrained import initial_variables, random_variables, tiny_pretraining
from tiny import tiny_config


def linear_config(**overrides):
    config = linear_cifar10.get_config()
    config.update(overrides)
    return config


@pytest.mark.slow
def test_linear_probe_on_moco_features_beats_random_init():
    """Features mode, full reference schedule (100 epochs, lr 30, drops at 60
    and 80) on the digits: the encoder after 100 MoCo steps against the
    encoder the same run started from. (At 40 steps of the default learning rate there is no gain yet:
    random convolutional features are already good for digits.)"""
    pretrain_config, workdir, _ = tiny_pretraining()
    config = linear_config(pretrained=workdir, mode="features", batch_size=64)
    trained = linear_eval.evaluate(config)
    random = linear_eval.evaluate(config, encoder=pretrained.Encoder(pretrain_config,
                                                                     initial_variables(pretrain_config)))
    # Seen: 77.4% vs 69.9% top-1 (359 test digits).
    assert trained["top1"] > random["top1"] + 0.03, (trained["top1"], random["top1"])
    assert trained["top5"] >= trained["top1"]
    assert trained["history"][-1]["step"] == 100 * (1438 // 64)  # 100 epochs


@pytest.mark.slow
def test_full_protocol_resumes_exactly(tmp_path):
    """8 devices; a run stopped after 4 steps and relaunched to 8 ends where an
    uninterrupted 8-step run does (same data order, crops and updates)."""
    encoder = pretrained.Encoder(tiny_config(), random_variables(tiny_config()))
    config = linear_config(batch_size=16, learning_rate=0.5, log_every_steps=2, checkpoint_every_steps=2,
                           eval_batch_size=128)
    straight = linear_eval.evaluate(linear_config(**{**config, "num_train_steps": 8}), str(tmp_path / "a"), encoder)
    linear_eval.evaluate(linear_config(**{**config, "num_train_steps": 4}), str(tmp_path / "b"), encoder)
    resumed = linear_eval.evaluate(linear_config(**{**config, "num_train_steps": 8}), str(tmp_path / "b"), encoder)

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
    linear_eval.evaluate(config, str(tmp_path), encoder)
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 3)
    resumed = linear_eval.evaluate(linear_config(**{**config, "num_train_steps": 6}), str(tmp_path), encoder)
    assert [h["step"] for h in resumed["history"]] == [4, 6]  # resumed from step 2
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir() and "checkpoint 4" in caplog.text
    with pytest.raises(checkpoint.CheckpointMismatchError, match="pretrained"):
        linear_eval.evaluate(linear_config(**{**config, "pretrained": "/elsewhere", "num_train_steps": 8}),
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


def test_labelled_batches_resume_and_keep_labels_with_images():
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(40) % 7
    fresh = linear_eval.labelled_batches(images, labels, 8, seed=3, num_local_devices=2)
    batches = [next(fresh) for _ in range(7)]  # crosses the epoch boundary (5 steps per epoch)
    resumed = linear_eval.labelled_batches(images, labels, 8, seed=3, start_step=6, num_local_devices=2)
    for want, got in zip(batches[6:], [next(resumed)]):
        np.testing.assert_array_equal(want[0], got[0])
        np.testing.assert_array_equal(want[1], got[1])
    x, y = batches[0]
    assert x.shape == (2, 4, 2, 2, 3) and y.shape == (2, 4)
    np.testing.assert_array_equal(x[..., 0, 0, 0] % 7, y)
    assert len({int(i) for b in batches[:5] for i in b[0][..., 0, 0, 0].ravel()}) == 40  # one epoch, no repeats


def test_topk_accuracies():
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert linear_eval.topk_accuracies(logits, np.array([1, 2]), ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}


def test_configs_default_to_the_reference_protocol():
    from configs import linear_imagenet

    for config in (linear_cifar10.get_config(), linear_imagenet.get_config()):
        assert (config.mode, config.learning_rate, config.batch_size, config.sgd_momentum) == ("full", 30.0, 256, 0.9)
        assert (config.weight_decay, config.num_epochs, config.lr_schedule) == (0.0, 100, "step")
        assert tuple(config.lr_drop_epochs) == (60, 80) and tuple(config.train_crop_scale) == (0.08, 1.0)
        assert config.eval_crop_fraction == 0.875
    imagenet = linear_imagenet.get_config()
    assert (imagenet.crop_size, imagenet.image_size) == (224, 256)  # Resize(256) + CenterCrop(224)
