"""The online linear probe (methods/online_probe.py): it trains on the query
view's backbone features inside the pretraining step, and the MoCo state is
bit-identical with it on and off."""

import json

import jax
import numpy as np
import pytest

from moco_jax import methods
from moco_jax.core import optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.training import checks, trainer
from tiny import tiny_config

V3 = dict(method="moco_v3", queue_size=0, shuffle_bn=False, momentum_schedule="cosine")
MOCO_FIELDS = ("step", "params", "opt_state", "momentum_params", "batch_stats", "momentum_batch_stats", "queue",
               "queue_ptr", "rng")


def _run(config, steps: int = 3):
    """`steps` pmap-ed steps on fixed digits-like batches: (host state, metrics of the last step)."""
    config = checks.resolve_for_devices(config, 8)
    tx, _ = optim.make_optimizer(config, 10)
    encoder = methods.build_encoder(config, sharding.AXIS)
    state = state_lib.create_train_state(jax.random.key(0), encoder, tx, (8, 8, 3),
                                         methods.get(config).queue_size(config), config.embed_dim)
    state = trainer.with_online_probe(state, config, encoder, num_classes=10)
    p_step = trainer.make_train_step(config, total_steps=40, num_classes=10)
    p_state, rng = state_lib.to_devices(state), np.random.default_rng(0)
    for _ in range(steps):
        images = rng.integers(0, 256, (8, 2, 8, 8, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, (8, 2)).astype(np.int32)
        batch = (images, labels) if config.online_probe else images
        p_state, metrics = p_step(p_state, sharding.shard(batch))
    return state_lib.from_devices(p_state), jax.device_get(metrics)


@pytest.mark.parametrize("overrides", [{}, V3], ids=["moco_v2", "moco_v3"])
def test_the_moco_state_is_bit_identical_with_the_probe_on_and_off(overrides):
    off, off_metrics = _run(tiny_config(**overrides))
    on, on_metrics = _run(tiny_config(online_probe=True, **overrides))
    for field in MOCO_FIELDS:
        for a, b in zip(jax.tree.leaves(getattr(off, field)), jax.tree.leaves(getattr(on, field))):
            np.testing.assert_array_equal(a, b, err_msg=field)
    assert off.probe is None and on.probe is not None
    for name in off_metrics:
        np.testing.assert_array_equal(off_metrics[name], on_metrics[name], err_msg=name)
    assert 0.0 <= float(on_metrics["online_top1"][0]) <= 1.0 and float(on_metrics["online_loss"][0]) > 0


def test_the_probe_learns_the_labels_of_its_features():
    """Labels that are a function of the image: the probe's training accuracy rises."""
    config = checks.resolve_for_devices(tiny_config(online_probe=True, online_probe_lr=0.5), 8)
    tx, _ = optim.make_optimizer(config, 10)
    encoder = methods.build_encoder(config, sharding.AXIS)
    state = state_lib.create_train_state(jax.random.key(0), encoder, tx, (8, 8, 3), 32, config.embed_dim)
    state = trainer.with_online_probe(state, config, encoder, num_classes=2)
    p_step = trainer.make_train_step(config, total_steps=100, num_classes=2)
    p_state, rng, top1 = state_lib.to_devices(state), np.random.default_rng(0), []
    for _ in range(40):
        labels = rng.integers(0, 2, (8, 2)).astype(np.int32)
        images = np.where(labels[..., None, None, None] == 1, 230, 20).astype(np.uint8) * np.ones((8, 2, 8, 8, 3),
                                                                                                 np.uint8)
        p_state, metrics = p_step(p_state, sharding.shard((images, labels)))
        top1.append(float(np.asarray(metrics["online_top1"])[0]))
    assert np.mean(top1[-10:]) > 0.9, top1


@pytest.mark.slow
def test_a_run_with_the_probe_logs_online_top1_and_resumes_it_exactly(tmp_path):
    """train.py's loop on the digits: metrics.jsonl has online_top1; a run
    stopped at step 2 and relaunched to 4 ends with the probe of an
    uninterrupted 4-step run."""
    config = dict(online_probe=True, num_train_steps=4, checkpoint_every_steps=2, lr_schedule="step")  # constant lr
    straight = trainer.train_and_evaluate(tiny_config(**config), str(tmp_path / "a"), show_progress=False)
    trainer.train_and_evaluate(tiny_config(**{**config, "num_train_steps": 2}), str(tmp_path / "b"),
                               show_progress=False)
    resumed = trainer.train_and_evaluate(tiny_config(**config), str(tmp_path / "b"), show_progress=False)
    for a, b in zip(jax.tree.leaves(straight["state"].probe), jax.tree.leaves(resumed["state"].probe)):
        np.testing.assert_array_equal(a, b)
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("online_top1" in r for r in logged)


def test_unlabelled_examples_are_left_out_of_the_probe():
    from moco_jax.methods import online_probe

    probe = online_probe.init(jax.random.key(0), 4, 3, 0.1)
    features = np.ones((4, 4), np.float32)
    loss_all, top1_all = online_probe._loss(probe["params"], features[:2], np.array([0, 1]), 3)
    loss, top1 = online_probe._loss(probe["params"], features, np.array([0, 1, -1, -1]), 3)
    np.testing.assert_allclose([loss, top1], [loss_all, top1_all], rtol=1e-6)
