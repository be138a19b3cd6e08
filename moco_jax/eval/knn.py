"""Weighted kNN classifier used to monitor self-supervised features.

This follows the InstDisc / official MoCo CIFAR demo monitor (`knn_predict`
in moco/colab demo): cosine similarity to a labelled feature bank, top-k
neighbours, each neighbour votes for its label with weight exp(sim / T).

`knn_predict` is the single-device reference. The monitor and the
evaluation programs run the same kNN at any scale (`streamed_counts`): the
bank's features are computed on every device of every process, a step of
images at a time, and stay where they were computed, each device holding
its shard; the queries stream past the shards, and each device's top k are
merged across the devices into the exact global top k (`owned_votes`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.core import sharding
from moco_jax.core.config import FRACTION, POSITIVE, STRING, integer
from moco_jax.data import ArrayDataset, Source
from moco_jax.data.feed import prefetch_to_device
from moco_jax.data.source import eval_positions, num_eval_steps
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
    return _votes(top_sim, bank_labels[top_idx], num_classes, temperature)


def _votes(sims, labels, num_classes, temperature):
    """(C, k) neighbour similarities and labels -> (C, num_classes): the sum
    of exp(sim / T) over each class's neighbours."""
    # Scatter-add instead of the demo's one-hot product: same sums, but memory
    # is O(C * k) rather than O(C * k * num_classes) (matters for 1000 classes).
    rows = jnp.arange(sims.shape[0])[:, None]
    return jnp.zeros((sims.shape[0], num_classes), jnp.float32).at[rows, labels].add(jnp.exp(sims / temperature))


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


# ---------------------------------------------------------------------------
# The kNN at scale: the bank stays where it was computed, spread over every
# device of every process; the queries stream past it.
#
# Each global step of a stream puts b rows on each of the n devices of the
# pmap axis (all processes, `sharding.pmap_devices`). A bank step writes the
# features of its rows into the device's preallocated shard (`write_bank`);
# the bank is never gathered. A query step gathers the step's G = n * b
# queries on every device, scores them against the device's shard (its top
# k), sends each query's candidates to the device that owns the query
# (all_to_all) and merges them there into the global top k, ties going to the
# lower bank position, as `knn_predict`'s top_k over the whole bank does: the
# same neighbours, the scores to float rounding.
# ---------------------------------------------------------------------------
AXIS = "knn"  # the pmap axis of the streamed kNN


@dataclasses.dataclass(frozen=True)
class Stream:
    """Labelled examples in global batches, as `Source.eval_batches` yields them.

    `batches(global_batch, process_index, process_count, num_local_devices)`
    yields exactly `num_eval_steps(size, global_batch)` steps of this process's
    share: (x (n_local, b, ...), labels int32 (n_local, b), valid bool
    (n_local, b), False = padding or a skipped image); step s covers the
    positions [s * G, (s + 1) * G), process p its contiguous p-th 1/P, split
    evenly over its local devices.

    Attributes:
      size: positions in the stream (skipped images included).
      batches: as above.
      description: what the examples are, for logs ("split 'train'").
    """

    size: int
    batches: Callable[[int, int, int, int], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]]
    description: str = ""


def array_stream(x: np.ndarray, labels: np.ndarray, description: str = "") -> Stream:
    """Host arrays x (N, ...) with labels (N,) as a `Stream` (the last step padded with zeros)."""
    x, labels = np.asarray(x), np.asarray(labels, np.int32)

    def batches(global_batch, process_index=0, process_count=1, num_local_devices=1):
        for step in range(num_eval_steps(len(x), global_batch)):
            positions = eval_positions(global_batch, step, process_index, process_count)
            valid = positions < len(x)
            rows = np.where(valid, positions, 0)
            part = np.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x[rows], 0).astype(x.dtype)
            yield tuple(a.reshape((num_local_devices, -1) + a.shape[1:])
                        for a in (part, np.where(valid, labels[rows], 0).astype(np.int32), valid))

    return Stream(len(x), batches, description)


def source_stream(source, *, split: str, size: int, crop_fraction: float, max_images: int = 0, seed: int = 0,
                  name: str = "") -> Stream:
    """The labelled images of `split` of a data source in the evaluation view
    (`source.eval_batches`: a resize to size / crop_fraction and the central
    size x size square), at most `max_images` of them (0 = all: the fixed
    random subset `knn_subset(N, max_images, seed)`); `name`: the split's
    name in logs ('' = `split`)."""
    count = source.num_labelled(split, max_images, seed)
    description = f"split {name or split!r}" if name or split else "the train split"
    if max_images:
        total = source.num_labelled(split, 0, seed)
        if total > count:
            description += f" (a fixed random {count} of its {total} images)"

    def batches(global_batch, process_index=0, process_count=1, num_local_devices=1):
        return source.eval_batches(split=split, size=size, crop_fraction=crop_fraction, global_batch=global_batch,
                                   process_index=process_index, process_count=process_count,
                                   num_local_devices=num_local_devices, max_images=max_images, seed=seed)

    return Stream(count, batches, description)


@dataclasses.dataclass(frozen=True)
class KnnData:
    """The kNN's labelled bank and queries, streamed; labels in [0, num_classes)."""

    bank: Stream
    queries: Stream
    num_classes: int
    name: str

    def describe(self) -> str:
        """'bank: N images of split 'train'; queries: Q images of split 'test'' (for logs: accuracies are
        comparable only over the same bank)."""
        return (f"bank: {self.bank.size} images of {self.bank.description}; "
                f"queries: {self.queries.size} images of {self.queries.description}")


def array_data(dataset: ArrayDataset) -> KnnData:
    """An in-memory dataset as kNN data: its train images the bank, its test images the queries."""
    return KnnData(array_stream(dataset.train_images, dataset.train_labels, "the train images"),
                   array_stream(dataset.test_images, dataset.test_labels, "the test images"),
                   dataset.num_classes, dataset.name)


class Bank(NamedTuple):
    """One device's shard of the bank (under pmap; outside, each leaf has a
    leading device axis). R rows: steps of the bank stream x b.

    features: per kind of feature, float32 (R, D_i) unit rows.
    labels: int32 (R,).
    positions: int32 (R,), each row's position in the bank stream.
    valid: bool (R,); False: padding, a skipped image, a row not written.
    filled: int32 (), the rows written so far.
    """

    features: tuple
    labels: jax.Array
    positions: jax.Array
    valid: jax.Array
    filled: jax.Array


def empty_bank(widths: Sequence[int], rows: int) -> Bank:
    """A device's bank shard of `rows` rows for features of `widths`, nothing written."""
    return Bank(tuple(jnp.zeros((rows, w), jnp.float32) for w in widths), jnp.zeros(rows, jnp.int32),
                jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool), jnp.zeros((), jnp.int32))


def write_bank(bank: Bank, features: Sequence[jax.Array], labels: jax.Array, valid: jax.Array) -> Bank:
    """One bank step on one device (under pmap over AXIS): its b rows, per
    kind (b, D_i) features (L2-normalised here), labels (b,), valid (b,),
    written after the rows already filled."""
    b, row = labels.shape[0], bank.filled
    step_start = (row // b) * b * jax.lax.axis_size(AXIS)
    positions = step_start + jax.lax.axis_index(AXIS) * b + jnp.arange(b, dtype=jnp.int32)
    put = lambda buffer, rows: jax.lax.dynamic_update_slice(buffer, rows, (row,) + (0,) * (rows.ndim - 1))  # noqa: E731
    features = tuple(put(buffer, l2_normalize(f.astype(jnp.float32))) for buffer, f in zip(bank.features, features))
    return Bank(features, put(bank.labels, labels.astype(jnp.int32)), put(bank.positions, positions),
                put(bank.valid, valid), row + b)


def _shard_top_k(queries, features, bank: Bank, k: int, chunk: int):
    """(G, D) unit queries against this device's (R, D) unit bank rows, in
    chunks of `chunk` queries (memory O(chunk * R)) -> for each query the k
    most similar valid rows of the shard: similarities float32 (G, k) (-inf:
    no row), bank positions and labels int32 (G, k)."""
    num_q = queries.shape[0]
    num_chunks = -(-num_q // chunk)
    padded = jnp.pad(queries, ((0, num_chunks * chunk - num_q), (0, 0))).reshape(num_chunks, chunk, -1)

    def one(q):
        sim = jnp.matmul(q, features.T, precision=jax.lax.Precision.HIGHEST)   # (chunk, R)
        top_sim, top_idx = jax.lax.top_k(jnp.where(bank.valid[None, :], sim, -jnp.inf), k)
        return top_sim, bank.positions[top_idx], bank.labels[top_idx]

    return tuple(x.reshape(num_chunks * chunk, k)[:num_q] for x in jax.lax.map(one, padded))


def _to_owners(x: jax.Array) -> jax.Array:
    """(G, m) values for each of the step's G = n * b queries (the same
    queries on every device) -> (b, n * m): for this device's own b queries,
    the m values of every device, device by device (all_to_all)."""
    n = jax.lax.axis_size(AXIS)
    g, m = x.shape
    received = jax.lax.all_to_all(x.reshape(n, g // n, m), AXIS, 0, 0)   # [i]: device i's values
    return received.transpose(1, 0, 2).reshape(g // n, n * m)


def _merge_top_k(sims, positions, labels, k: int):
    """(b, m) candidates -> the k most similar, (b, k) similarities and
    labels, ties to the lower bank position (as top_k over the whole bank)."""
    neg_sims, _, labels = jax.lax.sort((-sims, positions, labels), dimension=1, num_keys=2)
    return -neg_sims[:, :k], labels[:, :k]


def owned_votes(bank: Bank, queries: Sequence[jax.Array], num_classes: int, k: int, temperature: float,
                chunk: int) -> tuple[jax.Array, ...]:
    """One query step on one device (under pmap over AXIS).

    Args:
      bank: this device's shard (`write_bank`).
      queries: per kind, this device's (b, D_i) query features.
      k: neighbours, at most the bank's positions.
    Returns:
      per kind, float32 (b, num_classes): the weighted votes of each of this
      device's queries' k nearest neighbours in the whole bank (every
      device's shard), as `knn_predict`.
    """
    votes = []
    for features, q in zip(bank.features, queries):
        every = jax.lax.all_gather(l2_normalize(q.astype(jnp.float32)), AXIS, tiled=True)   # (G, D)
        candidates = _shard_top_k(every, features, bank, min(k, features.shape[0]), chunk)
        best, labels = _merge_top_k(*(_to_owners(c) for c in candidates), k)                 # (b, k)
        votes.append(_votes(best, labels, num_classes, temperature))
    return tuple(votes)


def count_correct(votes: Sequence[jax.Array], labels: jax.Array, valid: jax.Array) -> jax.Array:
    """int32 (kinds + 1,), summed over all devices (psum): per kind the
    valid queries whose top vote is their label, then the valid queries."""
    hits = [jnp.sum((jnp.argmax(v, axis=-1) == labels) & valid) for v in votes]
    return jax.lax.psum(jnp.stack(hits + [jnp.sum(valid)]).astype(jnp.int32), AXIS)


class _Programs(NamedTuple):
    write: Callable   # (bank, variables, x, labels, valid) -> bank, donated
    votes: Callable   # (bank, variables, x) -> per kind (b, num_classes) votes
    count: Callable   # (totals, bank, variables, x, labels, valid) -> totals + count_correct, donated
    bank_size: Callable  # (bank) -> its valid rows, over all devices


@functools.lru_cache(maxsize=16)
def _programs(embed_fn: Callable, devices: tuple, num_classes: int, k: int, temperature: float,
              chunk: int) -> _Programs:
    """The pmap-ed steps over `devices` (compiled on first use, once per shape)."""
    def votes(bank, variables, x):
        return owned_votes(bank, embed_fn(variables, x), num_classes, k, temperature, chunk)

    def count(totals, bank, variables, x, labels, valid):
        return totals + count_correct(votes(bank, variables, x), labels, valid)

    pmap = functools.partial(jax.pmap, axis_name=AXIS, devices=devices)
    return _Programs(
        write=pmap(lambda bank, variables, x, labels, valid: write_bank(bank, embed_fn(variables, x), labels, valid),
                   donate_argnums=(0,)),
        votes=pmap(votes), count=pmap(count, donate_argnums=(0,)),
        bank_size=pmap(lambda bank: jax.lax.psum(jnp.sum(bank.valid, dtype=jnp.int32), AXIS)))


@functools.lru_cache(maxsize=4)
def _empty_bank_fn(widths: tuple, rows: int, devices: tuple) -> Callable:
    return jax.pmap(lambda _: empty_bank(widths, rows), axis_name=AXIS, devices=devices)


def _local_zeros(devices: tuple, shape=(), dtype=np.int32) -> jax.Array:
    """Zeros (n, *shape) on the axis, built from this process's devices' rows."""
    n_local = sum(d.process_index == jax.process_index() for d in devices)
    return sharding.shard(np.zeros((n_local,) + tuple(shape), dtype), devices)


def _on_devices(stream: Stream, global_batch: int, devices: tuple) -> Iterator:
    """This process's share of each step of `stream`, on the axis, two steps ahead."""
    n_local = sum(d.process_index == jax.process_index() for d in devices)
    host = stream.batches(global_batch, jax.process_index(), jax.process_count(), n_local)
    return prefetch_to_device(host, size=2, devices=devices)


def _global_batch(batch_size: int, num_devices: int) -> int:
    """`batch_size` rounded up to a whole number of rows per device."""
    return max(1, -(-batch_size // num_devices)) * num_devices


def _widths(embed_fn: Callable, variables, x: jax.Array) -> tuple[int, ...]:
    """The widths D_i of the features `embed_fn` gives for one device's part of x (n, b, ...)."""
    one = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return tuple(s.shape[-1] for s in jax.eval_shape(embed_fn, variables, one))


def build_bank(embed_fn: Callable, programs: _Programs, variables, replicated, stream: Stream, global_batch: int,
               devices: tuple) -> Bank:
    """Every device's shard of the features of `stream` (`variables` on the
    host, `replicated` on the axis): leaves (n, steps * b, ...), sharded over
    `devices`, never gathered."""
    if not stream.size:
        raise ValueError(f"the kNN bank ({stream.description or 'a stream'}) has no images")
    batches = _on_devices(stream, global_batch, devices)
    first = next(batches)
    rows = num_eval_steps(stream.size, global_batch) * (global_batch // len(devices))
    bank = _empty_bank_fn(_widths(embed_fn, variables, first[0]), rows, devices)(_local_zeros(devices))
    for x, labels, valid in itertools.chain([first], batches):
        bank = programs.write(bank, replicated, x, labels, valid)
    return bank


class Counts(NamedTuple):
    """What `streamed_counts` found, over all processes."""

    correct: tuple[int, ...]  # per kind of feature: the valid queries whose prediction is their label
    queries: int  # the valid queries
    bank: int  # the valid bank rows: the images in the bank


def streamed_counts(embed_fn: Callable, variables, data: KnnData, *, k: int, temperature: float, batch_size: int,
                    chunk_size: int = 256, devices=None) -> Counts:
    """The weighted kNN's correct predictions for every kind of feature
    `embed_fn` gives, bank and queries streamed over every device of every
    process (all processes call it together).

    Args:
      embed_fn: (variables, x (b, ...)) -> a tuple of (b, D_i) features; a
        stable function (its pmap-ed steps are kept for the next call).
      variables: what `embed_fn` runs with (host arrays), replicated here.
      data: the bank and query streams.
      k, temperature: as `knn_predict` (k clipped to the bank's size).
      batch_size: examples per global step, rounded up to a multiple of the
        devices.
      chunk_size: queries scored at once on a device (memory O(chunk * R)).
      devices: the pmap axis; default every device of every process.
    """
    devices = tuple(devices or sharding.pmap_devices())
    global_batch = _global_batch(batch_size, len(devices))
    programs = _programs(embed_fn, devices, data.num_classes, min(k, data.bank.size), float(temperature),
                         min(chunk_size, global_batch))
    replicated = sharding.replicate(variables, devices)
    bank = build_bank(embed_fn, programs, variables, replicated, data.bank, global_batch, devices)
    totals = _local_zeros(devices, (len(bank.features) + 1,))
    for x, labels, valid in _on_devices(data.queries, global_batch, devices):
        totals = programs.count(totals, bank, replicated, x, labels, valid)
    totals, bank_size = sharding.unreplicate((totals, programs.bank_size(bank)))
    return Counts(tuple(int(c) for c in totals[:-1]), int(totals[-1]), int(bank_size))


def _identity(variables, x):
    """Features given as they are, as an embed_fn (no variables)."""
    del variables
    return (x,)


def _streamed_votes(embed_fn: Callable, variables, data: KnnData, *, k: int, temperature: float, batch_size: int,
                    chunk_size: int = 256, bank_batch: int = 0, devices=None) -> tuple[np.ndarray, ...]:
    """The votes behind `streamed_counts` (same arguments; `bank_batch`: the
    bank's global batch, 0 = batch_size), per kind float32 (Q, num_classes)
    for every query (valid or not) on the host of every process."""
    devices = tuple(devices or sharding.pmap_devices())
    global_batch = _global_batch(batch_size, len(devices))
    programs = _programs(embed_fn, devices, data.num_classes, min(k, data.bank.size), float(temperature),
                         min(chunk_size, global_batch))
    replicated = sharding.replicate(variables, devices)
    bank = build_bank(embed_fn, programs, variables, replicated, data.bank,
                      _global_batch(bank_batch or batch_size, len(devices)), devices)
    steps = [[sharding.gather_sharded(v) for v in programs.votes(bank, replicated, x)]
             for x, _, _ in _on_devices(data.queries, global_batch, devices)]
    if not steps:
        return tuple(np.zeros((0, data.num_classes), np.float32) for _ in bank.features)
    return tuple(np.concatenate(kind)[:data.queries.size] for kind in zip(*steps))


def sharded_knn_predict(query_features, bank_features, bank_labels, num_classes: int, k: int = 200,
                        temperature: float = 0.1, chunk_size: int = 256, devices=None) -> np.ndarray:
    """`knn_predict` on the streamed kNN's code: the bank split over `devices`
    (default: every device of every process), each holding about N / n rows,
    each step of queries scored against every shard and the shards' top k
    merged into the global top k on the device that owns the query, so the
    neighbours, and the scores to float rounding, are the single-device ones.

    Args and result: as `knn_predict` (float32 (Q, num_classes), on the host,
    of every query on every process).
    """
    bank = array_stream(np.asarray(bank_features, np.float32), bank_labels)
    queries = np.asarray(query_features, np.float32)
    data = KnnData(bank, array_stream(queries, np.zeros(len(queries), np.int32)), num_classes, "features")
    return _streamed_votes(_identity, {}, data, k=k, temperature=temperature, batch_size=chunk_size,
                           chunk_size=chunk_size, bank_batch=max(1, bank.size), devices=devices)[0]  # bank: 1 step


def knn_accuracy(query_features, query_labels, bank_features, bank_labels,
                 num_classes: int, k: int = 200, temperature: float = 0.1,
                 chunk_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of the weighted kNN on (Q, D) query features
    with (Q,) labels (`sharded_knn_predict`: the bank over every device)."""
    scores = sharded_knn_predict(query_features, bank_features, bank_labels, num_classes=num_classes, k=k,
                                 temperature=temperature, chunk_size=chunk_size)
    return float(np.mean(scores.argmax(-1) == np.asarray(query_labels)))


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


def monitor_data(source, config) -> KnnData:
    """The kNN monitor's bank and queries of a pretraining config, streamed
    from `source` (its `eval_batches`): the bank is `config.knn_train_split`
    ('' = train_split), at most `config.knn_max_train_images` images (0 =
    all; else the fixed random subset `knn_subset(N, cap, seed)`), the
    queries all of `config.eval_split`; files are centre-cropped to
    `config.crop_size` after a resize to crop_size / `config.knn_center_crop_fraction`."""
    view = dict(size=config.crop_size, crop_fraction=config.knn_center_crop_fraction, seed=config.seed)
    bank = source_stream(source, split=config.knn_train_split, max_images=config.knn_max_train_images,
                         name=config.knn_train_split or config.train_split, **view)
    queries = source_stream(source, split=config.eval_split, **view)
    return KnnData(bank, queries, source.num_classes(), source.name)
