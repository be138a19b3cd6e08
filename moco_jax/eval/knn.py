"""Weighted kNN classifier used to monitor self-supervised features.

This follows the InstDisc / official MoCo CIFAR demo monitor (`knn_predict`
in moco/colab demo): cosine similarity to a labelled feature bank, top-k
neighbours, each neighbour votes for its label with weight exp(sim / T).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.core.config import FRACTION, POSITIVE, STRING, integer
from moco_jax.data import ArrayDataset, Source
from moco_jax.methods.contrastive import l2_normalize

# The kNN monitor's fields (pretraining configs).
FIELDS = {"knn_train_split": STRING, "knn_max_train_images": integer(0), "knn_center_crop_fraction": FRACTION,
          "knn_k": integer(1), "knn_temperature": POSITIVE}


def _chunk_scores(queries, bank, bank_labels, num_classes, k, temperature):
    """(C, D) normalised queries -> (C, num_classes) weighted kNN votes."""
    # HIGHEST keeps float32 similarities (no TF32/bf16 passes) so neighbour
    # ranking does not depend on the accelerator's default matmul precision.
    sim = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
    top_sim, top_idx = jax.lax.top_k(sim, k)                    # (C, k)
    weights = jnp.exp(top_sim / temperature)                    # (C, k)
    labels = bank_labels[top_idx]                               # (C, k)
    # Scatter-add instead of the demo's one-hot product: same sums, but memory
    # is O(C * k) rather than O(C * k * num_classes) (matters for 1000 classes).
    rows = jnp.arange(queries.shape[0])[:, None]
    return jnp.zeros((queries.shape[0], num_classes), jnp.float32).at[
        rows, labels].add(weights)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def knn_predict(query_features, bank_features, bank_labels, num_classes: int,
                k: int = 200, temperature: float = 0.1,
                chunk_size: int = 256) -> jnp.ndarray:
    """Weighted kNN class scores (the MoCo demo's `pred_scores`).

    Args:
      query_features: (Q, D) features; L2-normalised here.
      bank_features: (N, D) labelled bank features; L2-normalised here.
      bank_labels: int (N,) labels in [0, num_classes).
      num_classes: number of classes (static).
      k: neighbours per query (static); clipped to N.
      temperature: T in the neighbour weight exp(cosine_sim / T).
      chunk_size: queries per chunk (static); bounds memory at O(chunk * N).
    Returns:
      float32 (Q, num_classes): sum of exp(sim / T) over the top-k neighbours
      of each class. argmax gives the prediction.
    """
    queries = l2_normalize(jnp.asarray(query_features, jnp.float32))
    bank = l2_normalize(jnp.asarray(bank_features, jnp.float32))
    bank_labels = bank_labels.astype(jnp.int32)
    k = min(k, bank.shape[0])
    num_q = queries.shape[0]
    chunk = max(1, min(chunk_size, num_q))
    # Pad Q up to a multiple of the chunk so lax.map sees one static shape;
    # the padded (zero) queries are dropped below.
    num_chunks = -(-num_q // chunk)
    padded = jnp.pad(queries, ((0, num_chunks * chunk - num_q), (0, 0)))
    scores = jax.lax.map(
        lambda q: _chunk_scores(q, bank, bank_labels, num_classes, k, temperature),
        padded.reshape(num_chunks, chunk, -1))
    return scores.reshape(num_chunks * chunk, num_classes)[:num_q]


def knn_accuracy(query_features, query_labels, bank_features, bank_labels,
                 num_classes: int, k: int = 200, temperature: float = 0.1,
                 chunk_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of knn_predict on (Q, D) queries with (Q,) labels."""
    scores = knn_predict(query_features, bank_features, bank_labels,
                         num_classes=num_classes, k=k, temperature=temperature,
                         chunk_size=chunk_size)
    predictions = np.asarray(jnp.argmax(scores, axis=-1))
    return float(np.mean(predictions == np.asarray(query_labels)))


def extract_features(apply_fn: Callable, images_uint8: np.ndarray,
                     batch_size: int) -> np.ndarray:
    """Run apply_fn over images in fixed-size batches and stack the outputs.

    The last batch is zero-padded to batch_size so a jitted apply_fn compiles
    once; the padded rows are dropped from the result.

    Args:
      apply_fn: (batch_size, H, W, C) uint8 -> (batch_size, D) features.
      images_uint8: uint8 (N, H, W, C), N >= 1.
      batch_size: examples per call.
    Returns:
      np.ndarray (N, D).
    """
    num = len(images_uint8)
    if num == 0 or batch_size < 1:
        raise ValueError(f"need >= 1 image and batch_size >= 1, got {num}, {batch_size}")
    outputs = []
    for start in range(0, num, batch_size):
        batch = images_uint8[start:start + batch_size]
        if len(batch) < batch_size:
            pad = np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        # Keep device outputs un-fetched so dispatch of the next batch is not
        # blocked by a device->host copy; convert all at the end.
        outputs.append(apply_fn(batch))
    return np.concatenate([np.asarray(o) for o in outputs])[:num]


def monitor_dataset(source: Source, config) -> ArrayDataset:
    """The kNN monitor's labelled images of a pretraining config: the bank is
    `config.knn_train_split` ('' = train_split), at most
    `config.knn_max_train_images` images (0 = all); the queries are the
    eval split; files are centre-cropped to `config.crop_size` after a
    resize to crop_size / `config.knn_center_crop_fraction`."""
    return source.labelled_arrays(size=config.crop_size, crop_fraction=config.knn_center_crop_fraction,
                                  max_train_images=config.knn_max_train_images, seed=config.seed,
                                  train_split=config.knn_train_split)
