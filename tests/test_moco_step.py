"""The pmap-ed MoCo step on 8 devices against a plain single-device version of
the same math, written here independently: explicit per-group BN over the
shuffled groups, the full queue in one array, one cross-entropy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moco_jax.core import sharding
from moco_jax.core import state as state_lib
from moco_jax import methods
from moco_jax.methods import moco_v2, momentum
from tiny import tiny_config

N_DEV, LOCAL = 8, 4
GLOBAL = N_DEV * LOCAL
K, T, M = 64, 0.2, 0.9


def _setup(**overrides):
    config = tiny_config(batch_size=GLOBAL, queue_size=K, **overrides)
    encoder = methods.build_encoder(config)
    tx = optax.sgd(1.0)  # lr 1, no momentum: the parameter change *is* the gradient
    state = state_lib.create_train_state(jax.random.key(0), encoder, tx, (8, 8, 3), K, config.embed_dim)
    return encoder, state


def _images(seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(GLOBAL, 8, 8, 3)), jnp.float32) for _ in range(2)]


def _forward_groups(encoder, params, stats, x, groups):
    """Unit embeddings of x with BN computed separately on each contiguous group
    (what `groups` devices with per-device BN compute), and the groups' mean
    running statistics."""

    def one_group(xg):
        (_, z), upd = encoder.apply({"params": params, "batch_stats": stats}, xg, train=True, mutable=["batch_stats"])
        return z / jnp.linalg.norm(z, axis=1, keepdims=True), upd["batch_stats"]

    z, new_stats = jax.vmap(one_group)(x.reshape((groups, -1) + x.shape[1:]))
    return z.reshape(x.shape[0], -1), jax.tree.map(lambda a: a.mean(0), new_stats)


@functools.partial(jax.jit, static_argnums=(0,))
def _reference_core(encoder, s, x_q, x_k, perms):
    """Keys, loss and gradient of one step on one device, whole batch and queue."""
    theta_k = jax.tree.map(lambda k, q: M * k + (1 - M) * q, s.momentum_params, s.params)
    pairs = [(x_q, x_k), (x_k, x_q)][: len(perms)]
    keys, k_stats = [], s.momentum_batch_stats
    for (_, xk), perm in zip(pairs, perms):
        k_shuffled, k_stats = _forward_groups(encoder, theta_k, k_stats, xk[perm], N_DEV)
        keys.append(k_shuffled[jnp.argsort(perm)])

    def loss_fn(params):
        total, stats = 0.0, s.batch_stats
        for (xq, _), k in zip(pairs, keys):
            q, stats = _forward_groups(encoder, params, stats, xq, N_DEV)
            logits = jnp.concatenate([jnp.sum(q * k, 1, keepdims=True), q @ s.queue.T], axis=1) / T
            total += optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(GLOBAL, jnp.int32)).mean()
        return total, stats

    (loss, q_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(s.params)
    return theta_k, keys, k_stats, loss, q_stats, grads


def reference_step(encoder, s, x_q, x_k, symmetric=False):
    """One MoCo step on one device, with the whole global batch and queue."""
    perm_rng = jax.random.split(s.rng, 3)[1]
    n_views = 2 if symmetric else 1
    perms = [np.asarray(jax.random.permutation(r, GLOBAL)) for r in jax.random.split(perm_rng, n_views)]
    theta_k, keys, k_stats, loss, q_stats, grads = _reference_core(encoder, s, x_q, x_k, perms)
    shards = np.asarray(s.queue).reshape(N_DEV, K // N_DEV, -1).copy()
    ptr = int(s.queue_ptr)
    for k in keys:
        for d in range(N_DEV):
            shards[d, ptr : ptr + LOCAL] = k[d * LOCAL : (d + 1) * LOCAL]
        ptr = (ptr + LOCAL) % (K // N_DEV)
    new = s.replace(
        params=jax.tree.map(lambda p, g: p - g, s.params, grads),
        momentum_params=theta_k,
        batch_stats=q_stats,
        momentum_batch_stats=k_stats,
        queue=jnp.asarray(shards.reshape(K, -1)),
        queue_ptr=jnp.int32(ptr),
        rng=jax.random.split(s.rng, 3)[0],
        step=s.step + 1,
    )
    return new, float(loss), grads, perms, keys


def _pmap_step(symmetric=False):
    hp = moco_v2.MoCoHParams(temperature=T, ema_momentum=M, symmetric=symmetric)
    identity_views = lambda rng, batch: batch  # noqa: E731 - the views are given
    return jax.pmap(functools.partial(moco_v2.train_step, hp=hp, views=identity_views), axis_name="batch")


def _per_device(x):
    return sharding.shard(np.asarray(x).reshape((N_DEV, LOCAL) + x.shape[1:]))


def _assert_tree_close(actual, expected, rtol=2e-4, what=""):
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        atol = rtol * max(np.abs(e).max(), 1e-3)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("symmetric", [False, True])
def test_pmap_step_matches_single_device_reference(symmetric):
    encoder, s0 = _setup()
    p_step = _pmap_step(symmetric)
    p_state = state_lib.to_devices(s0)
    ref = s0
    initial_rows = {tuple(np.round(r, 6)) for r in np.asarray(s0.queue)}
    seen_perms, all_keys = [], []
    for step in range(2):
        x_q, x_k = _images(step)
        p_state, metrics = p_step(p_state, (_per_device(x_q), _per_device(x_k)))
        ref_old = ref
        ref, ref_loss, ref_grads, perms, keys = reference_step(encoder, ref, x_q, x_k, symmetric)
        seen_perms += perms
        all_keys += keys
        host = state_lib.from_devices(p_state)

        np.testing.assert_allclose(np.asarray(metrics["loss"]), ref_loss, rtol=1e-5)
        grads = jax.tree.map(lambda old, new: old - new, ref_old.params, host.params)
        _assert_tree_close(grads, ref_grads, what="gradient")
        _assert_tree_close(host.momentum_params, ref.momentum_params, rtol=1e-6, what="momentum params")
        _assert_tree_close(host.batch_stats, ref.batch_stats, what="query BN stats")
        _assert_tree_close(host.momentum_batch_stats, ref.momentum_batch_stats, what="key BN stats")
        np.testing.assert_allclose(host.queue, ref.queue, atol=2e-5)
        assert int(host.queue_ptr) == int(ref.queue_ptr)
        assert int(host.step) == step + 1
        np.testing.assert_array_equal(host.rng, ref.rng)
        # Replicas stay identical: every device holds the same params.
        leaf = jax.tree.leaves(p_state.params)[0]
        np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[-1])
        # Compare each step's transition from the same state: with lr=1, float32
        # rounding differences of one step are amplified in the next.
        ref = host.replace(queue=jnp.asarray(host.queue))

    # A new permutation every step (and per view when symmetric).
    assert all(not np.array_equal(a, b) for i, a in enumerate(seen_perms) for b in seen_perms[i + 1 :])
    # K / global batch steps (symmetric: twice the keys per step) replace the
    # queue: no initial row is left; every row is one of this run's keys.
    final_rows = np.asarray(state_lib.from_devices(p_state).queue)
    if not symmetric:
        assert not {tuple(np.round(r, 6)) for r in final_rows} & initial_rows
    key_rows = np.concatenate([np.asarray(k) for k in all_keys])
    dist = np.abs(final_rows[:, None, :] - key_rows[None]).max(-1).min(-1)
    assert dist.max() < 2e-5


def test_metrics_topk_against_reference():
    encoder, s0 = _setup()
    x_q, x_k = _images(7)
    _, metrics = _pmap_step()(state_lib.to_devices(s0), (_per_device(x_q), _per_device(x_k)))
    # Reference accuracy: rank of the positive among [pos, negatives].
    _, _, _, _, (k,) = reference_step(encoder, s0, x_q, x_k)
    q, _ = _forward_groups(encoder, s0.params, s0.batch_stats, x_q, N_DEV)
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), np.asarray(q) @ np.asarray(s0.queue).T], 1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    np.testing.assert_allclose(np.asarray(metrics["top1"]), np.mean(top5[:, 0] == 0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["top5"]), np.mean((top5 == 0).any(1)), atol=1e-6)


def test_key_encoder_gets_no_gradient_and_momentum_update_is_exact():
    encoder, s0 = _setup()
    # Make the two encoders differ so the update is visible.
    s0 = s0.replace(momentum_params=jax.tree.map(lambda p: p + 1.0, s0.params))
    expected = jax.tree.map(lambda k, q: 0.9 * k + 0.1 * q, s0.momentum_params, s0.params)
    actual = momentum.momentum_update(s0.momentum_params, s0.params, 0.9)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-7, atol=1e-7)

    x = _images(3)[0][:LOCAL]
    hp = moco_v2.MoCoHParams(shuffle_bn=False)

    def key_loss(momentum_params):
        k, _ = moco_v2.compute_keys(s0, momentum_params, x, None, hp)
        return jnp.sum(k * jnp.arange(k.shape[1]))

    grads = jax.grad(key_loss)(s0.momentum_params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    # And the step's optimizer leaves the key encoder to the EMA alone.
    p_state, _ = _pmap_step()(state_lib.to_devices(s0), tuple(_per_device(v) for v in _images(4)))
    host = state_lib.from_devices(p_state)
    expected = jax.tree.map(lambda k, q: M * k + (1 - M) * q, s0.momentum_params, s0.params)
    _assert_tree_close(host.momentum_params, expected, rtol=1e-6, what="momentum params")
