"""Rematerialisation (`model.remat="blocks"`): the same parameters, and one
training step gives the same loss, metrics, parameters and BN statistics
as without it (float32 rounding), for a ResNet with split BN (MoCo v2),
a ResNet with SyncBN (MoCo v3) and a ViT (MoCo v3), on 8 devices. What it
saves at full size: benchmarks/remat_memory.py.

Each case runs in a process of its own: in a pytest worker that had run
most of the suite, the SyncBN case crashed the process (a segmentation
fault inside jaxlib 0.10.2, twice in full runs, never alone), and a crashed
worker left pytest-xdist waiting forever. A crash now fails this test, with
the child's exit status, and the run goes on."""
import multiprocessing
from concurrent import futures

import jax
import numpy as np
import pytest

from moco_jax import methods
from moco_jax.core import sharding
from moco_jax.core import state as state_lib
from moco_jax.core import optim
from moco_jax.training import trainer
from tiny import tiny_config

CASES = {
    "resnet_v2": dict(),
    "resnet_v3_syncbn": dict(method="moco_v3", queue_size=0, shuffle_bn=False, optimizer="lars",
                             weight_decay_mask="no_bn_bias", augmentation="cifar_v3",
                             model=dict(sync_bn=True, mlp_dim=16)),
    # SGD, not the recipe's AdamW: the attention's key bias has a zero gradient (softmax ignores it), whose
    # rounding noise AdamW would scale up to a full step, differently with and without remat.
    "vit_v3": dict(method="moco_v3", queue_size=0, shuffle_bn=False, optimizer="sgd", augmentation="cifar_v3",
                   model=dict(arch="vit", vit="test", patch_size=4, mlp_dim=16)),
}


def one_step(config):
    """(host state after one step, metrics, whether the step changed every
    parameter array, whether its program rematerialises: jax.checkpoint's
    optimization barriers)."""
    encoder = methods.build_encoder(config, axis_name=sharding.AXIS)
    tx, _ = optim.make_optimizer(config, 10)
    state = state_lib.create_train_state(jax.random.key(0), encoder, tx, (8, 8, 3),
                                         methods.get(config).queue_size(config), config.embed_dim)
    images = np.random.default_rng(1).integers(0, 256, (8, 2, 8, 8, 3), dtype=np.uint8)
    p_step = trainer.make_train_step(config, total_steps=10)
    p_state, batch = state_lib.to_devices(state), sharding.shard(images)
    rematerialised = "optimization_barrier" in p_step.lower(p_state, batch).as_text()
    p_state, metrics = p_step(p_state, batch)
    after = state_lib.from_devices(p_state)
    moved = all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(after.params)))
    return after, jax.device_get(metrics), moved, rematerialised


def compare_case(case):
    """In a new process: one step of `case` without and with remat. Returns
    (metrics, params, batch_stats, moved, barriers, same tree structure), the
    trees as [(path, without, with)] of host arrays."""
    assert jax.device_count() == 8, jax.device_count()
    plain, remat = (tiny_config(**CASES[case]) for _ in range(2))
    remat.model.remat = "blocks"
    (s0, m0, moved, barriers0), (s1, m1, _, barriers1) = one_step(plain), one_step(remat)
    pairs = lambda a, b: [(jax.tree_util.keystr(path), np.asarray(x), np.asarray(y))  # noqa: E731
                          for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))]
    metrics = [(key, np.asarray(m0[key]), np.asarray(m1[key])) for key in m0]
    return (metrics, pairs(s0.params, s1.params), pairs(s0.batch_stats, s1.batch_stats), moved,
            (barriers0, barriers1), jax.tree.structure(s0.params) == jax.tree.structure(s1.params))


@pytest.mark.parametrize("case", ["resnet_v2", pytest.param("resnet_v3_syncbn", marks=pytest.mark.slow),
                                  pytest.param("vit_v3", marks=pytest.mark.slow)])  # the quick tier keeps one
def test_remat_changes_no_number(case):
    # spawn: a fresh interpreter, which inherits conftest.py's 8 emulated devices through the environment
    with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        metrics, params, batch_stats, moved, (barriers0, barriers1), same_names = pool.submit(compare_case,
                                                                                              case).result()
    assert barriers1 and not barriers0  # the field took effect
    assert moved  # a real step: every parameter changed, so equal results say something
    assert same_names  # the same parameter names: checkpoints fit both
    for key, without, with_remat in metrics:
        np.testing.assert_allclose(with_remat, without, rtol=1e-5, atol=1e-6, err_msg=key)
    for name, leaves in (("params", params), ("batch_stats", batch_stats)):
        for path, without, with_remat in leaves:
            np.testing.assert_allclose(with_remat, without, rtol=1e-5, atol=1e-6, err_msg=f"{name} {path}")
