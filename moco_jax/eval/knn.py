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

from moco_jax.core import sharding
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


_SHARDS = "knn_shards"  # the pmap axis the bank is split over


def _sharded_chunk_scores(queries, bank, bank_labels, valid, num_classes, k, temperature):
    """One device's part of `sharded_knn_predict` for (C, D) unit queries:
    the top-k of its bank shard, merged with every other shard's into the
    global top-k (the global top k are among the shards' top k), then the
    weighted votes (C, num_classes), the same on every device."""
    sim = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)   # (C, N / n)
    sim = jnp.where(valid[None, :], sim, -jnp.inf)                           # padding rows: never neighbours
    top_sim, top_idx = jax.lax.top_k(sim, min(k, bank.shape[0]))            # (C, k_local)
    candidates = jax.lax.all_gather(top_sim, _SHARDS, axis=1, tiled=True)    # (C, n * k_local)
    candidate_labels = jax.lax.all_gather(bank_labels[top_idx], _SHARDS, axis=1, tiled=True)
    best, position = jax.lax.top_k(candidates, k)                           # (C, k)
    labels = jnp.take_along_axis(candidate_labels, position, axis=1)
    rows = jnp.arange(queries.shape[0])[:, None]
    return jnp.zeros((queries.shape[0], num_classes), jnp.float32).at[rows, labels].add(jnp.exp(best / temperature))


@functools.lru_cache(maxsize=16)
def _sharded_scores_fn(devices: tuple, num_classes: int, k: int) -> Callable:
    def scores(query_chunks, bank, bank_labels, valid, temperature):
        bank = l2_normalize(bank)
        return jax.lax.map(lambda q: _sharded_chunk_scores(l2_normalize(q), bank, bank_labels, valid, num_classes,
                                                           k, temperature), query_chunks)
    return jax.pmap(scores, axis_name=_SHARDS, in_axes=(None, 0, 0, 0, None), devices=devices)


def sharded_knn_predict(query_features, bank_features, bank_labels, num_classes: int, k: int = 200,
                        temperature: float = 0.1, chunk_size: int = 256, devices=None) -> np.ndarray:
    """`knn_predict` with the bank split over `devices` (this process's local
    devices by default): each holds N / n bank rows, so a bank n times larger
    fits, and all devices work. Every query is scored against every shard;
    each shard's top k are merged across the devices into the global top k,
    so the neighbours, and the scores to float rounding, are the
    single-device ones.

    Args and result: as `knn_predict` (float32 (Q, num_classes), on the host).
    """
    devices = tuple(devices or jax.local_devices())
    bank = np.asarray(bank_features, np.float32)
    num_bank = len(bank)
    shard = lambda x: sharding.shard_rows(x, devices)  # noqa: E731 - the last device's rows padded
    queries = np.asarray(query_features, np.float32)
    num_q = len(queries)
    chunk = max(1, min(chunk_size, num_q))
    num_chunks = -(-num_q // chunk)
    query_chunks = np.pad(queries, ((0, num_chunks * chunk - num_q), (0, 0))).reshape(num_chunks, chunk, -1)
    scores = _sharded_scores_fn(devices, num_classes, min(k, num_bank))(
        query_chunks, shard(bank), shard(np.asarray(bank_labels, np.int32)), shard(np.ones(num_bank, bool)),
        np.float32(temperature))
    return np.asarray(scores[0]).reshape(num_chunks * chunk, num_classes)[:num_q]


def knn_accuracy(query_features, query_labels, bank_features, bank_labels,
                 num_classes: int, k: int = 200, temperature: float = 0.1,
                 chunk_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of the weighted kNN on (Q, D) queries with
    (Q,) labels; the bank split over the devices (`sharded_knn_predict`) in a
    single-process job."""
    if jax.process_count() > 1:  # each process scores on its own: one device, as knn_predict
        scores = knn_predict(query_features, bank_features, np.asarray(bank_labels), num_classes=num_classes, k=k,
                             temperature=temperature, chunk_size=chunk_size)
    else:
        scores = sharded_knn_predict(query_features, bank_features, bank_labels, num_classes=num_classes, k=k,
                                     temperature=temperature, chunk_size=chunk_size)
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


@functools.lru_cache(maxsize=8)
def _on_devices(apply_fn: Callable, devices: tuple) -> Callable:
    return jax.pmap(apply_fn, devices=devices)


def extract_features_on_devices(apply_fn: Callable, variables, images_uint8: np.ndarray, batch_size: int,
                                devices=None) -> np.ndarray:
    """`extract_features` with each batch split over `devices` (this
    process's local devices by default), all of them working.

    Args:
      apply_fn: (variables, (B, H, W, C) uint8) -> (B, D) features; a stable
        function (its pmap-ed form is kept for the next call).
      variables: what `apply_fn` runs with, replicated here.
      images_uint8: uint8 (N, H, W, C), N >= 1.
      batch_size: images per step, over all the devices.
    Returns:
      np.ndarray (N, D).
    """
    devices = tuple(devices or jax.local_devices())
    n, num = len(devices), len(images_uint8)
    per_device = max(1, -(-batch_size // n))
    step = per_device * n
    replicated = sharding.replicate(variables, devices)
    p_apply = _on_devices(apply_fn, devices)
    outputs = []
    for start in range(0, num, step):
        batch = images_uint8[start:start + step]
        if len(batch) < step:
            batch = np.concatenate([batch, np.zeros((step - len(batch),) + batch.shape[1:], batch.dtype)])
        outputs.append(p_apply(replicated, batch.reshape(n, per_device, *batch.shape[1:])))
    return np.concatenate([np.asarray(o).reshape(step, -1) for o in outputs])[:num]


def monitor_dataset(source: Source, config) -> ArrayDataset:
    """The kNN monitor's labelled images of a pretraining config: the bank is
    `config.knn_train_split` ('' = train_split), at most
    `config.knn_max_train_images` images (0 = all); the queries are the
    eval split; files are centre-cropped to `config.crop_size` after a
    resize to crop_size / `config.knn_center_crop_fraction`."""
    return source.labelled_arrays(size=config.crop_size, crop_fraction=config.knn_center_crop_fraction,
                                  max_train_images=config.knn_max_train_images, seed=config.seed,
                                  train_split=config.knn_train_split)
