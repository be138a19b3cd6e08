"""Rematerialisation (`model.remat="blocks"`): the same parameters, and one
training step gives the same loss, metrics, parameters and BN statistics
as without it (float32 rounding), for a ResNet with split BN (MoCo v2),
a ResNet with SyncBN (MoCo v3) and a ViT (MoCo v3), on 8 devices. What it
saves at full size: benchmarks/remat_memory.py."""
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


@pytest.mark.parametrize("case", ["resnet_v2", pytest.param("resnet_v3_syncbn", marks=pytest.mark.slow),
                                  pytest.param("vit_v3", marks=pytest.mark.slow)])  # the quick tier keeps one
def test_remat_changes_no_number(case):
    plain, remat = (tiny_config(**CASES[case]) for _ in range(2))
    remat.model.remat = "blocks"
    (s0, m0, moved, barriers0), (s1, m1, _, barriers1) = one_step(plain), one_step(remat)
    assert barriers1 and not barriers0  # the field took effect
    assert moved  # a real step: every parameter changed, so equal results say something
    assert jax.tree.structure(s0.params) == jax.tree.structure(s1.params)  # the same names: checkpoints fit both
    for key in m0:
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for name, a, b in (("params", s0.params, s1.params), ("batch_stats", s0.batch_stats, s1.batch_stats)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=f"{name} {jax.tree_util.keystr(path)}")
