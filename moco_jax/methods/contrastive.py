"""The contrastive pieces the methods share: unit embeddings, and InfoNCE
against a queue of negatives sharded over the devices (MoCo v1/v2; MoCo v3's
in-batch loss is in moco_v3.py).

Functions taking `axis_name` run inside `jax.pmap(..., axis_name=...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit length, as `torch.nn.functional.normalize(x, dim=1)`.

    Written with rsqrt of the clamped squared norm rather than `norm`: the
    gradient of `jnp.linalg.norm` is NaN at a zero row, this one is finite
    there (as PyTorch's)."""
    return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def info_nce(
    q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float, axis_name: str
) -> tuple[jax.Array, jax.Array]:
    """InfoNCE against the whole queue while each device holds only a shard.

    The logits of one query are [q.k, q.queue_1, ..., q.queue_K] / T with the
    positive at index 0, and its loss is logsumexp(logits) - logits[0]. The K
    negatives are spread over n devices, so every device scores *all* B
    queries against its own K/n rows, and the log-sum-exp is combined across
    devices: a shared max (pmax) for stability, then the sums of exponentials
    are reduced and scattered back to the devices owning the queries
    (psum_scatter). The result equals the single-device computation on the
    full queue while per-device queue memory stays K*C/n.

    Gradients: `k` and `queue` are constants (stop_gradient: keys come from
    the momentum encoder, and the queue holds past keys); the gradient flows
    into `q`, including back through the all_gather to the device that owns
    each query. The max shift has no gradient because log-sum-exp does not
    depend on it.

    Args:
      q: (B_local, C) unit query embeddings.
      k: (B_local, C) unit keys; k[j] is the positive of q[j].
      queue: (K / n, C) this device's shard of the negatives.
    Returns:
      loss (B_local,) per query, and rank (B_local,): how many negatives score
      above the positive (0 means top-1 correct).
    """
    k, queue = lax.stop_gradient(k), lax.stop_gradient(queue)
    local = q.shape[0]
    start = lax.axis_index(axis_name) * local

    l_pos = jnp.sum(q * k, axis=-1) / temperature  # (B_local,)
    q_all = lax.all_gather(q, axis_name, tiled=True)  # (B, C)
    # Full float32 precision: the default TF32/bf16 matmul passes on GPU/TPU
    # would score the negatives less exactly than l_pos, which matters at
    # T = 0.07; this matmul is a tiny part of the step.
    l_neg = jnp.matmul(q_all, queue.T, precision=lax.Precision.HIGHEST) / temperature  # (B, K/n)
    l_pos_all = lax.all_gather(lax.stop_gradient(l_pos), axis_name, tiled=True)  # (B,)

    shift_all = lax.pmax(jnp.maximum(lax.stop_gradient(l_neg).max(axis=1), l_pos_all), axis_name)
    sum_neg = lax.psum_scatter(
        jnp.exp(l_neg - shift_all[:, None]).sum(axis=1), axis_name, scatter_dimension=0, tiled=True
    )  # (B_local,) sum over all K negatives of our own queries
    shift = lax.dynamic_slice_in_dim(shift_all, start, local)
    log_sum_exp = shift + jnp.log(jnp.exp(l_pos - shift) + sum_neg)
    loss = log_sum_exp - l_pos

    above = (lax.stop_gradient(l_neg) > l_pos_all[:, None]).sum(axis=1).astype(jnp.float32)
    rank = lax.psum_scatter(above, axis_name, scatter_dimension=0, tiled=True)
    return loss, rank
