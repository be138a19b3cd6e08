"""End to end: the default experiment, shrunk, on 8 emulated devices."""

import json

import jax
import numpy as np
import pytest

from moco_jax.core import optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.data import source
from moco_jax.data.sources import arrays
from moco_jax.data.feed import prefetch_to_device
from moco_jax.training import metrics, trainer
from moco_jax import methods
from tiny import tiny_config

_LOWERINGS = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _LOWERINGS.append(event)
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration"
    else None
)


def test_no_recompilation_after_the_first_step():
    config = tiny_config()
    encoder = methods.build_encoder(config)
    tx, _ = optim.make_optimizer(config, steps_per_epoch=10)
    state = state_lib.create_train_state(jax.random.key(0), encoder, tx, (8, 8, 3), 32, config.embed_dim)
    p_state = state_lib.to_devices(state)
    p_step = trainer.make_train_step(config)
    images = arrays.load_digits(image_size=8).train_images
    batches = prefetch_to_device(source.array_batches(images, 16, seed=0, num_local_devices=8))
    p_state, metrics = p_step(p_state, next(batches))
    jax.block_until_ready(metrics)
    before = len(_LOWERINGS)
    for _ in range(3):
        p_state, metrics = p_step(p_state, next(batches))
    jax.block_until_ready(metrics)
    assert len(_LOWERINGS) == before, "the train step was compiled again after step 1"
    assert int(sharding.unreplicate(p_state.step)) == 4


@pytest.mark.slow
def test_default_config_trains_end_to_end(tmp_path):
    """The default experiment at 16 px (width 16, K=256) on 8 devices.

    Crops are turned off (views differ by colour and flip only) so that 40
    steps suffice to see learning. The first logged window is low because the
    initial queue holds random unit vectors, which are easy negatives
    (expected); after 4 steps of 64 the queue holds only real keys, and from
    there the loss must fall, below chance level log(K + 1).
    """
    config = tiny_config(
        num_train_steps=40, log_every_steps=10, batch_size=64, queue_size=256, image_size=16, crop_size=16,
        crop_scale=(1.0, 1.0), temperature=0.2, embed_dim=128,
    )
    config.model.width = 16
    result = trainer.train_and_evaluate(config, workdir=str(tmp_path), show_progress=False)
    history = result["history"]
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    losses = [h["loss"] for h in history]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[1] - 0.15, losses
    assert losses[-1] < np.log(config.queue_size + 1) - 0.3, losses
    assert history[-1]["learning_rate"] < history[0]["learning_rate"]  # cosine decay
    assert history[-1]["images_per_sec"] > 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [h["step"] for h in history]
    # Weight norms at the start and with each kNN monitor (here only the last step's).
    monitored = {r["step"]: r for r in logged if "loss" not in r}
    assert sorted(monitored) == [0, 40]
    groups = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert set(monitored[40]) == {"step", "weight_norm/head", *(f"weight_norm/backbone/{g}" for g in groups)}
    final_norms = metrics.weight_norms(result["state"].params)
    assert {k: v for k, v in monitored[40].items() if k != "step"} == pytest.approx(final_norms, rel=1e-12)
    assert monitored[0] != monitored[40]
    for accuracies in (result["knn_random"], result["knn_trained"]):
        assert set(accuracies) == {"backbone", "projection"}
        assert all(0.0 <= a <= 1.0 for a in accuracies.values())
    assert int(result["state"].step) == 40
    assert result["state"].queue.shape == (256, 128)


def test_the_random_init_knn_is_measured_once_per_run_and_read_back_after(tmp_path):
    calls = []

    def evaluate():
        calls.append(1)
        return {"backbone": 0.25, "projection": 0.5}

    config = tiny_config()
    first = trainer.random_init_knn(str(tmp_path), config, evaluate)
    assert trainer.random_init_knn(str(tmp_path), config, evaluate) == first == evaluate()
    assert len(calls) == 2  # the first launch, and the direct call just above
    assert (tmp_path / metrics.KNN_RANDOM_NAME).exists()
    # What the random-init kNN depends on changed: measured again (and stored for the new settings).
    for changed in (tiny_config(knn_k=5), tiny_config(seed=1), tiny_config(embed_dim=16), tiny_config(crop_size=6)):
        trainer.random_init_knn(str(tmp_path), changed, evaluate)
    assert len(calls) == 6
    trainer.random_init_knn(str(tmp_path), tiny_config(crop_size=6), evaluate)
    assert len(calls) == 6
    trainer.random_init_knn(None, config, evaluate)  # no workdir: nothing to read back
    assert len(calls) == 7


@pytest.mark.slow
def test_a_relaunch_does_not_evaluate_the_random_init_again(tmp_path, monkeypatch):
    evaluations = []
    monitor = trainer.knn_monitor

    def counting_monitor(config, dataset):
        knn_fn = monitor(config, dataset)
        return lambda variables: evaluations.append(1) or knn_fn(variables)

    monkeypatch.setattr(trainer, "knn_monitor", counting_monitor)
    first = trainer.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path), show_progress=False)
    assert len(evaluations) == 2  # random init, trained
    second = trainer.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path), show_progress=False)
    assert len(evaluations) == 3  # trained only
    assert second["knn_random"] == first["knn_random"]
    assert int(second["state"].step) == 4
