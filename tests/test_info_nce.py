"""The distributed log-sum-exp InfoNCE equals the single-device loss on the
full queue, in value, gradient and positive rank."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moco_jax.methods import contrastive


N_DEV, LOCAL, K, C, T = 8, 3, 40, 6, 0.1


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=(N_DEV * LOCAL, C))).astype(np.float32)
    k = _unit(q + 0.5 * rng.normal(size=q.shape)).astype(np.float32)
    queue = _unit(rng.normal(size=(K, C))).astype(np.float32)
    return q, k, queue


def _reference_losses(q, k, queue):
    logits = jnp.concatenate([jnp.sum(q * k, 1, keepdims=True), q @ queue.T], axis=1) / T
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(len(q), jnp.int32))


def _sharded(q, k, queue):
    return (q.reshape(N_DEV, LOCAL, C), k.reshape(N_DEV, LOCAL, C), queue.reshape(N_DEV, K // N_DEV, C))


def test_distributed_loss_equals_full_queue_loss():
    q, k, queue = _data()
    loss, rank = jax.pmap(lambda *a: contrastive.info_nce(*a, T, "batch"), axis_name="batch")(*_sharded(q, k, queue))
    np.testing.assert_allclose(np.asarray(loss).reshape(-1), _reference_losses(q, k, queue), rtol=1e-5, atol=1e-6)
    l_pos = np.sum(q * k, 1)
    expected_rank = (q @ queue.T > l_pos[:, None]).sum(1)
    np.testing.assert_array_equal(np.asarray(rank).reshape(-1), expected_rank)


def test_distributed_loss_is_stable_for_small_temperatures():
    q, k, queue = _data(1)
    t = 0.005  # logits up to 200: a naive exp would overflow float32
    loss, _ = jax.pmap(lambda *a: contrastive.info_nce(*a, t, "batch"), axis_name="batch")(*_sharded(q, k, queue))
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1).astype(np.float64) / t
    m = logits.max(1, keepdims=True)
    expected = (m[:, 0] + np.log(np.exp(logits - m).sum(1))) - logits[:, 0]
    assert np.all(np.isfinite(np.asarray(loss)))
    np.testing.assert_allclose(np.asarray(loss).reshape(-1), expected, rtol=1e-4, atol=1e-3)


def test_distributed_gradient_equals_full_queue_gradient():
    """Gradient w.r.t. the queries (it crosses devices: a query's negatives
    live on every device) and none w.r.t. keys or queue."""
    q, k, queue = _data(2)

    def local_mean_loss(q, k, queue):
        return contrastive.info_nce(q, k, queue, T, "batch")[0].mean()

    grads = jax.pmap(jax.grad(local_mean_loss, argnums=(0, 1, 2)), axis_name="batch")(*_sharded(q, k, queue))
    # pmap differentiates each device's local mean; their mean is the gradient
    # of the global mean, i.e. per query: d(mean over all)/dq * n_devices.
    ref_q, ref_k, ref_queue = jax.grad(lambda *a: _reference_losses(*a).mean(), argnums=(0, 1, 2))(q, k, queue)
    np.testing.assert_allclose(np.asarray(grads[0]).reshape(-1, C), ref_q * N_DEV, rtol=1e-4, atol=1e-6)
    assert not np.any(np.asarray(grads[1])) and not np.any(np.asarray(grads[2]))
    assert np.any(np.asarray(ref_k)) and np.any(np.asarray(ref_queue))  # the reference does depend on them
