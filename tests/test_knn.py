"""Tests for moco_jax.eval.knn against hand-built banks and a numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moco_jax.data.source import eval_positions
from moco_jax.eval import knn


def numpy_knn_scores(q, bank, labels, num_classes, k, t):
    """Independent reference of the MoCo demo's knn_predict (pred_scores)."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sim = q @ bank.T
    k = min(k, len(bank))
    idx = np.argsort(-sim, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, idx, 1) / t)
    one_hot = np.eye(num_classes)[labels[idx]]             # (Q, k, C)
    return (one_hot * weights[..., None]).sum(1)


def clustered(rng, num_classes, per_class, dim, noise):
    """Points around orthogonal basis directions e_c, labelled c."""
    labels = np.repeat(np.arange(num_classes), per_class)
    feats = np.eye(dim)[labels] + noise * rng.normal(size=(len(labels), dim))
    return feats.astype(np.float32), labels.astype(np.int32)


def test_orthogonal_clusters_are_classified():
    rng = np.random.default_rng(0)
    bank, bank_labels = clustered(rng, 4, 20, 6, 0.1)
    queries, query_labels = clustered(rng, 4, 5, 6, 0.1)
    acc = knn.knn_accuracy(queries * 7.0, query_labels, bank, bank_labels,
                           num_classes=4, k=10)
    assert acc == 1.0


def test_matches_numpy_reference_and_scale_invariance():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(37, 16)).astype(np.float32)
    bank = rng.normal(size=(120, 16)).astype(np.float32)
    labels = rng.integers(0, 5, size=120).astype(np.int32)
    expected = numpy_knn_scores(q.astype(np.float64), bank.astype(np.float64), labels, 5, 9, 0.5)
    got = knn.knn_predict(q * 3.0, bank, labels, num_classes=5, k=9, temperature=0.5)
    assert got.shape == (37, 5)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4)


def test_temperature_weighting_overrides_majority_vote():
    # One very close class-0 neighbour vs two farther class-1 neighbours.
    query = np.array([[1.0, 0.0]], np.float32)
    bank = np.array([[1.0, 0.0], [0.5, np.sqrt(0.75)], [0.5, -np.sqrt(0.75)]], np.float32)
    labels = np.array([0, 1, 1], np.int32)
    sharp = np.asarray(knn.knn_predict(query, bank, labels, 2, k=3, temperature=0.1))[0]
    np.testing.assert_allclose(sharp, [np.exp(10.0), 2 * np.exp(5.0)], rtol=1e-4)
    assert sharp.argmax() == 0  # weighting beats 2-vs-1 majority
    flat = np.asarray(knn.knn_predict(query, bank, labels, 2, k=3, temperature=100.0))[0]
    assert flat.argmax() == 1   # near-uniform weights -> majority vote
    # k=1 keeps only the nearest neighbour.
    one = np.asarray(knn.knn_predict(query, bank, labels, 2, k=1, temperature=0.1))[0]
    np.testing.assert_allclose(one, [np.exp(10.0), 0.0], rtol=1e-4)


def test_k_larger_than_bank_is_clipped():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(4, 3)).astype(np.float32)
    bank = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0], np.int32)
    got = np.asarray(knn.knn_predict(q, bank, labels, 3, k=1000, temperature=0.2))
    np.testing.assert_allclose(got, numpy_knn_scores(q, bank, labels, 3, 5, 0.2), rtol=1e-4)


def test_chunking_matches_single_chunk():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(10, 8)).astype(np.float32)
    bank = rng.normal(size=(30, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=30).astype(np.int32)
    whole = knn.knn_predict(q, bank, labels, 4, k=7, chunk_size=1000)
    chunked = knn.knn_predict(q, bank, labels, 4, k=7, chunk_size=3)  # 10 = 3+3+3+1
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6)


def test_knn_accuracy_fraction():
    rng = np.random.default_rng(4)
    bank, bank_labels = clustered(rng, 4, 10, 4, 0.05)
    queries, query_labels = clustered(rng, 4, 2, 4, 0.05)
    wrong = query_labels.copy()
    wrong[:2] = (wrong[:2] + 1) % 4  # 2 of 8 labels now disagree with the clusters
    assert knn.knn_accuracy(queries, wrong, bank, bank_labels, 4, k=5) == pytest.approx(0.75)


def test_extract_features_pads_to_one_shape():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    seen = []

    def apply_fn(batch):
        seen.append(batch.shape)
        return jnp.asarray(batch, jnp.float32).reshape(len(batch), -1).mean(-1, keepdims=True)

    feats = knn.extract_features(apply_fn, images, batch_size=4)
    assert seen == [(4, 4, 4, 3)] * 3
    expected = images.reshape(10, -1).astype(np.float32).mean(-1, keepdims=True)
    np.testing.assert_allclose(feats, expected, rtol=1e-6)
    assert isinstance(feats, np.ndarray) and feats.shape == (10, 1)


def test_knn_predict_under_user_jit():
    rng = np.random.default_rng(6)
    q = rng.normal(size=(6, 4)).astype(np.float32)
    bank = rng.normal(size=(12, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=12).astype(np.int32)
    fn = jax.jit(lambda a, b, c, t: knn.knn_predict(a, b, c, 3, k=4, temperature=t))
    np.testing.assert_allclose(np.asarray(fn(q, bank, labels, 0.3)),
                               numpy_knn_scores(q, bank, labels, 3, 4, 0.3), rtol=1e-4)


@pytest.mark.parametrize("num_bank,k", [(203, 9), (203, 203), (13, 5), (64, 30)])
def test_the_bank_split_over_8_devices_finds_the_brute_force_neighbours(num_bank, k):
    """Shards of 26 rows (the last padded), k above and below the rows per
    shard, k = the whole bank: the votes equal a float64 brute-force kNN."""
    rng = np.random.default_rng(num_bank + k)
    bank, queries = rng.normal(size=(num_bank, 12)), rng.normal(size=(37, 12))
    labels = rng.integers(0, 6, num_bank).astype(np.int32)
    got = knn.sharded_knn_predict(queries, bank, labels, num_classes=6, k=k, temperature=0.3, chunk_size=8)
    assert len(jax.local_devices()) == 8
    want = numpy_knn_scores(queries, bank, labels, 6, k, 0.3)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    single = np.asarray(knn.knn_predict(queries, bank, labels, num_classes=6, k=k, temperature=0.3))
    np.testing.assert_allclose(got, single, rtol=1e-6, atol=1e-6)


def two_kinds(variables, x):
    """An embed_fn of features given as they are: the whole rows and their first 5 columns."""
    del variables
    return x, x[:, :5]


def skipping(stream, skipped):
    """`stream` with the images at positions `skipped` marked invalid (as a
    source skips undecodable images: valid False, the step's shape kept)."""
    def batches(global_batch, process_index=0, process_count=1, num_local_devices=1):
        for step, (x, labels, valid) in enumerate(stream.batches(global_batch, process_index, process_count,
                                                                 num_local_devices)):
            positions = eval_positions(global_batch, step, process_index, process_count).reshape(valid.shape)
            yield x, labels, valid & ~np.isin(positions, skipped)
    return knn.Stream(stream.size, batches, stream.description)


def test_the_streamed_knn_on_8_devices_finds_the_brute_force_neighbours():
    """A bank of 203 written in 9 steps of 24 (3 rows per device, the last
    step padded; each device's rows interleaved with the others'), 7 of its
    images skipped; 37 queries in 2 steps, 3 skipped: for both kinds of
    feature, every query's votes equal a float64 brute-force kNN over the
    bank's valid rows, and the counts follow from them."""
    rng = np.random.default_rng(7)
    bank, queries = rng.normal(size=(203, 12)).astype(np.float32), rng.normal(size=(37, 12)).astype(np.float32)
    bank_labels, query_labels = rng.integers(0, 6, 203).astype(np.int32), rng.integers(0, 6, 37).astype(np.int32)
    bank_skipped, query_skipped = np.array([0, 5, 26, 100, 150, 201, 202]), np.array([3, 30, 36])
    data = knn.KnnData(skipping(knn.array_stream(bank, bank_labels), bank_skipped),
                       skipping(knn.array_stream(queries, query_labels), query_skipped), 6, "random")
    kept = np.setdiff1d(np.arange(203), bank_skipped)
    votes = knn._streamed_votes(two_kinds, {}, data, k=9, temperature=0.3, batch_size=24, chunk_size=7)
    counts = knn.streamed_counts(two_kinds, {}, data, k=9, temperature=0.3, batch_size=24, chunk_size=7)
    valid_queries = np.setdiff1d(np.arange(37), query_skipped)
    assert counts.bank == len(kept) and counts.queries == len(valid_queries)
    for kind, (got, cols) in enumerate(zip(votes, (slice(None), slice(0, 5)))):
        want = numpy_knn_scores(queries[:, cols].astype(np.float64), bank[kept][:, cols].astype(np.float64),
                                bank_labels[kept], 6, 9, 0.3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
        single = np.asarray(knn.knn_predict(queries[:, cols], bank[kept][:, cols], bank_labels[kept], 6, k=9,
                                            temperature=0.3))
        np.testing.assert_array_equal(got.argmax(1), single.argmax(1))
        hits = (want.argmax(1) == query_labels)[valid_queries].sum()
        assert counts.correct[kind] == hits
    assert len(set(counts.correct)) == 2 and 0 < min(counts.correct), "the kinds must differ, and score something"


def test_ties_go_to_the_lower_bank_position_as_on_one_device():
    """Four copies of the query's direction at bank positions 1, 2 (label 1)
    and 8, 9 (label 0); one row per device and step, so positions 8 and 1 lie
    on device 0 and 1, 9 and 2 on device 1 and 2. k = 2: the single-device
    top_k keeps positions 1 and 2 (label 1); merging the shards' candidates
    device by device would keep 8 and 1 (a 1:1 vote, label 0)."""
    bank = np.tile(np.eye(16, dtype=np.float32)[1:], (2, 1))[:16]  # every row far from e_0 ...
    bank[[1, 2, 8, 9]] = np.eye(16, dtype=np.float32)[0]            # ... but four copies of it
    labels = np.full(16, 2, np.int32)
    labels[[1, 2]], labels[[8, 9]] = 1, 0
    query = np.eye(16, dtype=np.float32)[:1]
    single = np.asarray(knn.knn_predict(query, bank, labels, 3, k=2, temperature=0.5))
    assert single.argmax() == 1
    data = knn.KnnData(knn.array_stream(bank, labels), knn.array_stream(query, np.ones(1, np.int32)), 3, "ties")
    votes = knn._streamed_votes(lambda v, x: (x,), {}, data, k=2, temperature=0.5, batch_size=8)[0]
    np.testing.assert_allclose(votes, single, rtol=1e-6)
    assert knn.streamed_counts(lambda v, x: (x,), {}, data, k=2, temperature=0.5, batch_size=8).correct == (1,)
