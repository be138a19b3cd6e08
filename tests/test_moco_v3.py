"""The pmap-ed MoCo v3 step on 8 devices against a plain single-device
version of the same math written here: one forward over the whole global
batch (so plain BN *is* SyncBN), the full key matrix, one cross-entropy per
direction, the cosine momentum formula, and AdamW's first step by hand."""

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import moco_v3_tiny
from moco_jax.core import optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.training import trainer
from moco_jax import methods
from moco_jax.methods import moco_v3, momentum

N_DEV, LOCAL, SIZE = 8, 2, 16
GLOBAL = N_DEV * LOCAL
STEP, TOTAL = 3, 10  # a step in the middle of the cosine momentum schedule


def _config(**model):
    config = moco_v3_tiny.get_config()
    config.batch_size = GLOBAL
    config.warmup_epochs = 0.0
    config.learning_rate = 1.5e-3  # small AdamW steps: the first-step comparison stays tight
    config.model.update(model)
    return config


def _state(config, tx=None):
    encoder = methods.build_encoder(config)
    tx = tx or optax.sgd(1.0)
    state = state_lib.create_train_state(jax.random.key(0), encoder, tx, (SIZE, SIZE, 3), 0, config.embed_dim)
    # Perturb the key encoder and the BN statistics, so that the test sees
    # whether the momentum update and the statistics use the right trees.
    noise = lambda t, s: jax.tree.map(  # noqa: E731
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(s), a.shape), t)
    return state.replace(step=jnp.asarray(STEP, jnp.int32), momentum_params=noise(state.momentum_params, 1))


def _views():
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.normal(size=(GLOBAL, SIZE, SIZE, 3)), jnp.float32) for _ in range(2)]


def _reference(config, state, x1, x2):
    """Loss, gradient, momentum params and BN statistics of one v3 step, on one device."""
    encoder = methods.build_encoder(config, axis_name=None)  # whole-batch BN == SyncBN over the devices
    m0, t = config.momentum, config.temperature
    m = 1 - (1 - m0) * (math.cos(math.pi * STEP / TOTAL) + 1) / 2
    unit = lambda z: z / jnp.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731

    def forward(params, stats, x, method=None):
        (_, z), upd = encoder.apply({"params": params, "batch_stats": stats}, x, train=True,
                                    mutable=["batch_stats"], method=method)
        return z, upd["batch_stats"]

    def ctr(q, k):
        logits = unit(q) @ unit(k).T / t
        return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, axis=1))) * 2 * t

    @jax.jit  # (compiled: the same math op by op takes longer than compiling it)
    def step(params, momentum_params, batch_stats, momentum_batch_stats):
        theta_k = {name: jax.tree.map(lambda k, q: m * k + (1 - m) * q, momentum_params[name], params[name])
                   for name in momentum_params}
        k1, k_stats = forward(theta_k, momentum_batch_stats, x1)
        k2, k_stats = forward(theta_k, k_stats, x2)

        def loss_fn(p):
            q1, stats = forward(p, batch_stats, x1, "query")
            q2, stats = forward(p, stats, x2, "query")
            return ctr(q1, k2) + ctr(q2, k1), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, theta_k, stats, k_stats

    return step(state.params, state.momentum_params, state.batch_stats, state.momentum_batch_stats)


def _pmapped(fn, state, x1, x2):
    p_state = state_lib.to_devices(state)
    split = lambda x: x.reshape((N_DEV, LOCAL) + x.shape[1:])  # noqa: E731
    return _pmap(fn)(p_state, split(x1), split(x2))


@functools.lru_cache(maxsize=None)
def _pmap(fn):
    return jax.pmap(fn, axis_name=sharding.AXIS)


@functools.lru_cache(maxsize=None)
def _loss_and_grads_fn(hp):
    """One function object per hp, so that tests calling it share its compilation."""
    return lambda s, a, b: moco_v3.loss_and_grads(s, (a, b), hp)


def _hp(config):
    return trainer.step_hparams(config, TOTAL)


def _close(a, b, atol=2e-5, rtol=2e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=rtol), a, b)


def _close_to_scale(a, b, tol=1e-5):
    """Each leaf equal up to `tol` times its largest entry: float32 sums
    in another order differ by that much on the small entries of a leaf
    (and by 1e-7 on leaves whose gradient is zero in exact arithmetic)."""
    jax.tree.map(lambda u, v: np.testing.assert_allclose(
        np.asarray(u), np.asarray(v), atol=tol * float(np.abs(np.asarray(v)).max()) + 1e-6, rtol=0), a, b)


def test_loss_grads_momentum_and_syncbn_match_reference(stop_grad_patch=False):
    """(The frozen patch projection: test_train_step_with_adamw_... below.)"""
    config = _config(stop_grad_patch=stop_grad_patch)
    state = _state(config)
    x1, x2 = _views()
    hp = _hp(config)
    loss, correct, grads, theta_k, stats, k_stats, _ = _pmapped(_loss_and_grads_fn(hp), state, x1, x2)
    ref_loss, ref_grads, ref_theta_k, ref_stats, ref_k_stats = _reference(config, state, x1, x2)

    # The step's loss is each device's local mean; their mean is the global one.
    np.testing.assert_allclose(float(np.mean(loss)), float(ref_loss), rtol=1e-5)
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731 - replicated: device 0's copy
    _close_to_scale(first(grads), ref_grads)
    _close(first(theta_k), ref_theta_k, atol=1e-7, rtol=1e-6)
    _close(first(stats), ref_stats)
    _close(first(k_stats), ref_k_stats)
    # SyncBN: the head's statistics are the global batch's, identical on every device.
    for tree in (stats, k_stats):
        jax.tree.map(lambda a: np.testing.assert_array_equal(np.asarray(a), np.asarray(a[:1]).repeat(N_DEV, 0)), tree)
    assert set(ref_stats) == {"head", "predictor"} and set(ref_k_stats) == {"head"}
    patch = first(grads)["backbone"]["patch_embed"]
    assert (np.abs(np.asarray(patch["kernel"])).max() == 0) == stop_grad_patch
    assert correct.shape == (N_DEV, 2 * LOCAL)


def test_train_step_with_adamw_matches_a_hand_written_first_step():
    """The whole step (views, loss, AdamW, momentum, statistics) against the
    reference gradient and AdamW's first update written out: with m = (1-b1) g
    and v = (1-b2) g^2 after one step, the bias-corrected update is
    g / (|g| + eps), then the decoupled decay lr * wd * p."""
    config = _config(stop_grad_patch=True)
    tx, schedule = optim.make_optimizer(config, steps_per_epoch=TOTAL)
    state = _state(config, tx)
    state = state.replace(opt_state=tx.init(state.params))
    x1, x2 = _views()
    hp = _hp(config)
    views = lambda rng, batch: (batch[0], batch[1])  # noqa: E731 - the views as given
    new, metrics = _pmapped(lambda s, a, b: moco_v3.train_step(s, (a, b), hp, views), state, x1, x2)
    ref_loss, grads, theta_k, stats, k_stats = _reference(config, state, x1, x2)

    lr, wd, eps = float(schedule(0)), config.weight_decay, 1e-8  # opt_state counts from 0: the first update
    assert lr > 0

    def adamw(path, p, g):
        if path[:2] == ("backbone", "patch_embed"):
            return p  # frozen: no update, no decay
        return p - lr * (g / (np.abs(g) + eps)) - lr * wd * p

    from flax import traverse_util
    flat_p, flat_g = traverse_util.flatten_dict(state.params), traverse_util.flatten_dict(grads)
    expected = traverse_util.unflatten_dict({k: adamw(k, np.asarray(v), np.asarray(flat_g[k]))
                                             for k, v in flat_p.items()})
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    # The sign-like AdamW update amplifies tiny gradient differences where |g| ~ eps: compare loosely.
    _close(first(new.params), expected, atol=2e-4, rtol=1e-4)
    frozen = first(new.params)["backbone"]["patch_embed"]
    _close(frozen, state.params["backbone"]["patch_embed"], atol=0, rtol=0)
    _close(first(new.momentum_params), theta_k, atol=1e-7, rtol=1e-6)
    _close(first(new.batch_stats), stats)
    _close(first(new.momentum_batch_stats), k_stats)
    np.testing.assert_allclose(float(metrics["loss"][0]), float(ref_loss), rtol=1e-5)
    assert new.queue is None and int(new.step[0]) == STEP + 1


def test_loss_is_symmetric_and_scaled_by_2t():
    """Swapping the views leaves the loss unchanged, and at T the loss of
    identical unit queries and keys is 2T * CE of the known logits."""
    config = _config(stop_grad_patch=False)  # the config of the test above: its compiled step serves here
    state = _state(config)
    x1, x2 = _views()
    run = lambda a, b: _pmapped(_loss_and_grads_fn(_hp(config)), state, a, b)[0]  # noqa: E731
    np.testing.assert_allclose(np.mean(run(x1, x2)), np.mean(run(x2, x1)), rtol=1e-5)

    # Orthonormal keys, q = k: logits are 1/T on the diagonal, 0 elsewhere.
    k = jnp.eye(GLOBAL, 32)
    loss, correct = jax.pmap(lambda q, kk: moco_v3.contrastive_loss(q, kk, 0.2, "i"), axis_name="i")(
        k.reshape(N_DEV, LOCAL, 32), k.reshape(N_DEV, LOCAL, 32))
    expected = 2 * 0.2 * -(1 / 0.2 - np.log(np.exp(1 / 0.2) + GLOBAL - 1))
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)
    assert np.all(np.asarray(correct) == 1)


def test_cosine_momentum_schedule():
    """moco-v3 `adjust_moco_momentum`: m0 at the start, (1 + m0) / 2 half-way, 1 at the end."""
    m0, total = 0.99, 1000
    official = lambda e: 1.0 - 0.5 * (1.0 + math.cos(math.pi * e / total)) * (1.0 - m0)  # noqa: E731
    for step in (0, 1, 250, 500, 999, 1000):
        np.testing.assert_allclose(float(momentum.momentum_at(step, m0, "cosine", total)), official(step), rtol=1e-6)
    assert float(momentum.momentum_at(500, m0, "cosine", total)) == pytest.approx((1 + m0) / 2)
    assert momentum.momentum_at(500, m0, "constant", total) == m0
    assert float(momentum.momentum_at(total, m0, "cosine", total)) == pytest.approx(1.0)


def _official_lars(params, grads_seq, lrs, wd, momentum, trust):
    """moco-v3 `moco/optimizer.py` LARS, line by line in numpy."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_seq, lrs):
        for k, p in params.items():
            dp = grads[k].astype(np.float64)
            if p.ndim > 1:
                dp = dp + wd * p
                pn, un = np.linalg.norm(p), np.linalg.norm(dp)
                q = trust * pn / un if (pn > 0 and un > 0) else 1.0
                dp = dp * q
            mu[k] = mu[k] * momentum + dp
            params[k] = p - lr * mu[k]
    return params


def test_lars_matches_the_official_optimizer():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32),
              "zero": np.zeros((3, 3), np.float32)}
    grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
    lrs = [0.0, 0.5, 1.0, 0.7]  # a warm-up then decay: where optax.lars's lr-before-momentum would differ
    schedule = lambda step: jnp.asarray(lrs)[step]  # noqa: E731
    mask = lambda p: optim.weight_decay_mask(p, "no_bn_bias")  # noqa: E731
    tx = optim.lars(schedule, weight_decay=1e-2, momentum=0.9, trust_coefficient=0.001, mask=mask)
    p, s = jax.tree.map(jnp.asarray, params), tx.init(params)
    for g in grads_seq:
        updates, s = tx.update(jax.tree.map(jnp.asarray, g), s, p)
        p = optax.apply_updates(p, updates)
    expected = _official_lars(params, grads_seq, lrs, 1e-2, 0.9, 0.001)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=1e-5, atol=1e-7)
    # The 1-D bias had plain momentum SGD; the zero matrix a trust ratio of 1.
    assert not np.allclose(np.asarray(p["zero"]), 0)


def test_adamw_decay_mask():
    """With zero gradients AdamW's update is the decoupled decay alone: -lr * wd * p
    exactly on the masked parameters (all; or all but the 1-D ones), 0 elsewhere."""
    from flax import traverse_util

    config = _config(stop_grad_patch=False)
    params = _state(config).params
    for mask in ("all", "no_bn_bias"):
        config.optimizer, config.weight_decay_mask = "adamw", mask
        tx, schedule = optim.make_optimizer(config, steps_per_epoch=TOTAL)
        updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        lr = float(schedule(0))
        for path, u in traverse_util.flatten_dict(updates).items():
            p = traverse_util.flatten_dict(params)[path]
            decayed = mask == "all" or p.ndim > 1
            np.testing.assert_allclose(np.asarray(u), -lr * config.weight_decay * np.asarray(p) if decayed else 0,
                                       rtol=1e-6, atol=1e-12, err_msg=f"{mask} {path}")


def test_config_refuses_v2_fields_with_v3():
    from moco_jax.training.checks import validate_config
    from moco_jax.core.errors import ConfigError

    config = _config()
    validate_config(config, N_DEV)
    for field, value, words in (("queue_size", 64, "no queue"), ("shuffle_bn", True, "SyncBN"),
                                ("crop_size", 14, "multiple of model.patch_size")):
        bad = _config()
        bad[field] = value
        with pytest.raises(ConfigError, match=words):
            validate_config(bad, N_DEV)
    bad = _config()
    bad.model.conv_init = "pytorch"
    with pytest.raises(ConfigError, match="ResNet convolutions only"):
        validate_config(bad, N_DEV)


def _run_config(**overrides):
    config = moco_v3_tiny.get_config()
    config.update(dict(batch_size=GLOBAL, num_train_steps=4, log_every_steps=1, checkpoint_every_steps=2,
                       checkpoints_to_keep=5, eval_batch_size=512, knn_max_train_images=256), **overrides)
    return config


@pytest.mark.slow
def test_trainer_resumes_a_v3_run_bit_exactly_and_the_encoder_serves_downstream(tmp_path):
    """Through the real trainer on 8 devices: a run stopped after its step-2
    checkpoint and relaunched ends in the state of the uninterrupted run
    (cosine momentum and AdamW included). Its encoder then loads for kNN and
    the linear probe on [CLS] features."""
    import shutil

    from configs import linear_cifar10
    from moco_jax import pretrained
    from moco_jax.training import probe as linear_probe
    from moco_jax.io import checkpoint

    config = _run_config()
    straight = trainer.train_and_evaluate(config, str(tmp_path / "a"), show_progress=False)
    # The same run, stopped after its step-2 save: its workdir without what came later.
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("4", "metrics.jsonl",
                                                                                  "final_metrics.json"))
    resumed = trainer.train_and_evaluate(config, str(tmp_path / "b"), show_progress=False)
    assert [h["step"] for h in resumed["history"]] == [3, 4]  # only the steps after the checkpoint ran
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(straight["state"]),
                            jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert straight["state"].queue is None and set(straight["knn_trained"]) == {"backbone", "projection"}
    momenta = [h["momentum"] for h in straight["history"]]
    np.testing.assert_allclose(momenta, [momentum.momentum_at(s, 0.99, "cosine", 4) for s in range(4)], rtol=1e-6)

    encoder = pretrained.load(str(tmp_path / "a"))
    assert encoder.feature_dim == 32 and "predictor" in encoder.variables["params"]
    probe = linear_cifar10.get_config()
    probe.update(dict(pretrained=str(tmp_path / "a"), mode="features", batch_size=64, num_epochs=2,
                      dataset="digits", image_size=16, max_train_images=256))
    result = linear_probe.evaluate(probe)
    assert 0.0 < result["top1"] <= result["top5"] <= 1.0

    # A v2 config cannot resume the v3 workdir: the method is a model field.
    v2 = _run_config(method="moco_v2", queue_size=32, shuffle_bn=True)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="method"):
        trainer.train_and_evaluate(v2, str(tmp_path / "a"), show_progress=False)


CIFAR10_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


@pytest.mark.slow
def test_tiny_vit_learns_on_a_cifar10_subset():
    """End to end on real images: the "test" ViT (2 blocks of width 32, 4x4
    patches) trained 10 epochs on 2,000 CIFAR-10 train images with the v3
    recipe; kNN (bank: those 2,000, queries: the 10,000 test images) against
    the same encoder at initialisation. Seen: 25.4% / 24.7% random, 27.5% /
    29.3% trained (backbone / projection). The longer run with a bigger ViT
    is in BENCHMARKS.md ("MoCo v3")."""
    if not CIFAR10_DIR.is_dir():
        pytest.skip(f"CIFAR-10 not found: {CIFAR10_DIR} does not exist (see ../shared/data/README.md)")
    from configs import moco_v3_cifar10

    config = moco_v3_cifar10.get_config()
    config.update(dict(dataset="cifar10_arrays", data_dir=str(CIFAR10_DIR), train_subset=2000,
                       knn_max_train_images=2000, embed_dim=64, batch_size=64, num_epochs=10, warmup_epochs=1.0,
                       knn_every_epochs=0.0, checkpoint_every_epochs=0.0, learning_rate=6e-3, log_every_steps=31))
    config.model.update(dict(vit="test", mlp_dim=128, dtype="float32"))
    result = trainer.train_and_evaluate(config, None, show_progress=False)
    random, trained = result["knn_random"], result["knn_trained"]
    assert trained["projection"] > random["projection"] + 0.03, (random, trained)
    assert trained["backbone"] > random["backbone"] + 0.01, (random, trained)
