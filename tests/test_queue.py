"""The negatives queue: FIFO writes into one device's shard, wrap-around and
pointer arithmetic."""

import jax.numpy as jnp
import numpy as np

from moco_jax.core import state as state_lib
from moco_jax.methods import moco_v2
import jax


def test_enqueue_is_fifo_and_wraps_around():
    shard_rows, batch, dim = 12, 4, 3
    queue, ptr = jnp.zeros((shard_rows, dim)), jnp.int32(0)
    pointers = []
    for step in range(1, 7):  # 6 writes of 4 rows into 12: two full turns
        keys = jnp.full((batch, dim), float(step))
        queue, ptr = moco_v2.enqueue(queue, ptr, keys)
        pointers.append(int(ptr))
        # The newest batch sits just before the pointer, the oldest at it.
        newest = (int(ptr) - batch) % shard_rows
        np.testing.assert_array_equal(queue[newest : newest + batch], keys)
        if step >= 3:
            oldest = np.asarray(queue[int(ptr) : int(ptr) + batch])
            assert np.all(oldest == step - 2)  # written 2 writes ago: next to go
    assert pointers == [4, 8, 0, 4, 8, 0]
    # After two full turns the shard holds exactly the last 3 batches.
    assert sorted(set(np.asarray(queue)[:, 0])) == [4.0, 5.0, 6.0]


def test_enqueue_is_jittable_with_a_traced_pointer():
    queue = jnp.arange(16.0).reshape(8, 2)
    new, ptr = jax.jit(moco_v2.enqueue)(queue, jnp.int32(6), -jnp.ones((2, 2)))
    assert int(ptr) == 0
    np.testing.assert_array_equal(new[6:], -1)
    np.testing.assert_array_equal(new[:6], queue[:6])


def test_initial_queue_is_random_unit_vectors():
    queue = np.asarray(state_lib.random_unit_queue(jax.random.key(0), 64, 16))
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-6)
    # Random directions: nearly orthogonal on average, not all alike.
    cos = queue @ queue.T
    assert np.abs(cos[np.triu_indices(64, 1)]).mean() < 0.35
