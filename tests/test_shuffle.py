"""Shuffle BN on 8 devices, both modes (all_gather, all_to_all): keys return
to their own queries exactly, the BN groups are the permutation's slices,
every device draws the same permutation and it changes every step; the
all_to_all step equals the all-gather one given the same permutation; and the
per-device memory of the compiled step follows the local batch, not the
device count."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moco_jax.core import models, sharding
from moco_jax.core import state as state_lib
from moco_jax import methods
from moco_jax.methods import moco_v2, shuffle_bn
from tiny import tiny_config

N_DEV, LOCAL = 8, 16
GLOBAL = N_DEV * LOCAL
MODES = shuffle_bn.SHUFFLE_MODES


class _SmallEncoder(nn.Module):
    """Dense -> BN -> ReLU -> Dense: a step that compiles in a few seconds,
    with train-mode BN statistics like the ResNets."""

    @nn.compact
    def __call__(self, x, train):
        h = nn.Dense(32)(x.reshape(x.shape[0], -1))
        h = nn.relu(models.SplitBatchNorm(use_running_average=not train)(h))
        return h, nn.Dense(8)(h)


def _per_device(x):
    return sharding.shard(np.asarray(x).reshape((N_DEV, LOCAL) + x.shape[1:]))


def _row_ids():
    """(B, 3) rows that name themselves: row i is (i, i^2, -i), all distinct."""
    i = np.arange(GLOBAL, dtype=np.float32)
    return np.stack([i, i * i, -i], axis=1)


def _group_centred(x):
    """A BN-like encode: rows minus their group's mean, plus the group mean as
    aux. A row encoded in the wrong group gets a different value."""
    mean = x.mean(axis=0)
    return x - mean, mean


def _shuffle(mode, encode):
    """pmap over 8 devices: (rng (2,) replicated, x (8, LOCAL, ...)) ->
    (keys, aux, the permutation each device drew)."""
    hp = moco_v2.MoCoHParams(shuffle_mode=mode)
    resolved = shuffle_bn.resolve_shuffle_mode(mode, LOCAL, N_DEV)
    forward = shuffle_bn.all_to_all_shuffled_forward if resolved == "all_to_all" else shuffle_bn.shuffled_forward

    def run(raw_rng, x):
        perm = moco_v2.draw_permutation(jax.random.wrap_key_data(raw_rng), hp, x.shape[0])
        keys, aux = forward(encode, x, perm, hp.axis_name)
        return keys, aux, perm

    return jax.pmap(run, axis_name=hp.axis_name)


def _replicated_rng(seed):
    return sharding.replicate(np.asarray(jax.random.key_data(jax.random.key(seed))))


@pytest.mark.parametrize("mode", MODES)
def test_keys_return_to_their_own_queries_exactly(mode):
    x = _row_ids()
    keys, _, perms = _shuffle(mode, lambda v: (v, None))(_replicated_rng(0), _per_device(x))
    np.testing.assert_array_equal(np.asarray(keys).reshape(GLOBAL, -1), x)
    # ... and they really travelled: device j encoded the permutation's slice j.
    assert not np.array_equal(np.asarray(perms)[0], np.arange(GLOBAL))


@pytest.mark.parametrize("mode", MODES)
def test_bn_groups_are_the_permutation_slices(mode):
    """Single-device reference: BN over group j = the images perm[j*B_local:(j+1)*B_local]."""
    x = np.random.default_rng(1).normal(size=(GLOBAL, 3)).astype(np.float32)
    keys, means, perms = _shuffle(mode, _group_centred)(_replicated_rng(1), _per_device(x))
    perm = np.asarray(perms)[0]
    groups = x[perm].reshape(N_DEV, LOCAL, -1)
    expected_shuffled = (groups - groups.mean(axis=1, keepdims=True)).reshape(GLOBAL, -1)
    expected = expected_shuffled[np.argsort(perm)]
    np.testing.assert_allclose(np.asarray(keys).reshape(GLOBAL, -1), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(means), groups.mean(axis=1), rtol=1e-6, atol=1e-6)
    # A wrong grouping would show: per-device (unshuffled) groups give other keys.
    local = x.reshape(N_DEV, LOCAL, -1)
    unshuffled = (local - local.mean(axis=1, keepdims=True)).reshape(GLOBAL, -1)
    assert np.abs(unshuffled - expected).max() > 0.1


@pytest.mark.parametrize("mode", MODES)
def test_permutation_is_shared_by_all_devices_and_new_every_step(mode):
    x = _per_device(_row_ids())
    shuffle = _shuffle(mode, lambda v: (v, None))
    rng, seen = jax.random.key(3), []
    for _ in range(3):
        # The step's own key schedule: state.rng -> (next rng, perm rng, views rng).
        rng, perm_rng, _ = jax.random.split(rng, 3)
        _, _, perms = shuffle(sharding.replicate(np.asarray(jax.random.key_data(perm_rng))), x)
        perms = np.asarray(perms)
        assert all(np.array_equal(p, perms[0]) for p in perms[1:]), "devices drew different permutations"
        np.testing.assert_array_equal(np.sort(perms[0]), np.arange(GLOBAL))
        seen.append(perms[0])
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])


def test_stratified_permutation_takes_the_same_number_from_every_device():
    perm = np.asarray(shuffle_bn.stratified_permutation(jax.random.key(5), N_DEV, LOCAL))
    np.testing.assert_array_equal(np.sort(perm), np.arange(GLOBAL))
    sources = perm.reshape(N_DEV, LOCAL) // LOCAL
    for row in sources:
        np.testing.assert_array_equal(np.bincount(row, minlength=N_DEV), LOCAL // N_DEV)
    # Random order inside a slice (so split-BN sub-groups mix devices too).
    assert any(np.any(np.diff(row) < 0) for row in sources)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        shuffle_bn.stratified_permutation(jax.random.key(5), N_DEV, 4)


def test_all_to_all_keys_match_single_device_bn_over_the_same_groups():
    """`compute_keys` (key encoder, train-mode BN): all_to_all equals a
    single-device reference that encodes each group of the permutation on its
    own, and equals the all-gather path given the same permutation."""
    encoder = _SmallEncoder()
    state = state_lib.create_train_state(jax.random.key(0), encoder, optax.sgd(0.1), (4, 4, 3), 64, 8)
    x = np.random.default_rng(2).normal(size=(GLOBAL, 4, 4, 3)).astype(np.float32)
    perm = np.asarray(shuffle_bn.stratified_permutation(jax.random.key(7), N_DEV, LOCAL))

    def keys_fn(mode):
        hp = moco_v2.MoCoHParams(shuffle_mode=mode)
        step = lambda s, xs, p: moco_v2.compute_keys(s, s.momentum_params, xs, p, hp)  # noqa: E731
        return jax.pmap(step, axis_name=hp.axis_name, in_axes=(None, 0, None))

    keys, stats = keys_fn("all_to_all")(state, _per_device(x), perm)
    keys = np.asarray(keys).reshape(GLOBAL, -1)

    @jax.vmap
    def encode_group(xg):
        (_, z), upd = encoder.apply(
            {"params": state.momentum_params, "batch_stats": state.momentum_batch_stats}, xg, train=True,
            mutable=["batch_stats"],
        )
        return z / jnp.linalg.norm(z, axis=1, keepdims=True), upd["batch_stats"]

    z, group_stats = encode_group(x[perm].reshape((N_DEV, LOCAL) + x.shape[1:]))
    expected = np.asarray(z).reshape(GLOBAL, -1)[np.argsort(perm)]
    np.testing.assert_allclose(keys, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(jax.tree.leaves(stats), jax.tree.leaves(group_stats)):  # device j: group j's statistics
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
    # Per-device BN without the shuffle would give other keys: the check can fail.
    z_local, _ = encode_group(x.reshape((N_DEV, LOCAL) + x.shape[1:]))
    assert np.abs(np.asarray(z_local).reshape(GLOBAL, -1) - expected).max() > 1e-2

    gathered, _ = keys_fn("all_gather")(state, _per_device(x), perm)
    np.testing.assert_allclose(keys, np.asarray(gathered).reshape(GLOBAL, -1), rtol=1e-6, atol=1e-6)


def test_unknown_shuffle_mode_is_rejected():
    with pytest.raises(ValueError, match="shuffle_mode"):
        moco_v2.MoCoHParams(shuffle_mode="ring")


def _step_memory(mode, num_devices, local_batch, queue_size=256, side=16):
    """memory_analysis() of the pmap-ed train step compiled on the first
    `num_devices` devices: per-device bytes."""
    state = state_lib.create_train_state(
        jax.random.key(0), _SmallEncoder(), optax.sgd(0.1), (side, side, 3), queue_size, 8
    )
    devices = jax.devices()[:num_devices]
    hp = moco_v2.MoCoHParams(shuffle_mode=mode)
    step = jax.pmap(
        functools.partial(moco_v2.train_step, hp=hp, views=lambda rng, x: (x, x)),
        axis_name=hp.axis_name, devices=devices, donate_argnums=(0,),
    )
    p_state = state_lib.to_devices(state, devices)
    assert p_state.queue.addressable_shards[0].data.shape == (1, queue_size // num_devices, 8)
    images = sharding.shard(np.zeros((num_devices, local_batch, side, side, 3), np.float32), devices)
    return step.lower(p_state, images).compile().memory_analysis()


def _footprint(stats):
    """Per-device bytes: arguments + outputs - donated aliases + temporaries."""
    return (
        stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )


def test_per_device_memory_grows_with_the_local_batch_not_the_device_count():
    """The same local batch on 4 and on 8 devices, and twice the local batch
    on 4. The queue shard (an argument) is K*C/n; with the all_to_all shuffle
    the footprint does not grow with n (it shrinks by the queue), while
    doubling the local batch grows it by more than the extra images. The
    all-gather shuffle holds the whole global batch of images on every
    device, so there the footprint does grow with n, by the gathered images;
    which also shows that the measurement can see growth with n."""
    queue_size, side, local = 256, 16, 8
    image_bytes = side * side * 3 * 4
    a2a_4, a2a_8 = _step_memory("all_to_all", 4, local), _step_memory("all_to_all", 8, local)
    a2a_4_double = _step_memory("all_to_all", 4, 2 * local)
    # Arguments differ only by the queue shard: K*C/4 - K*C/8 float32 rows.
    assert a2a_4.argument_size_in_bytes - a2a_8.argument_size_in_bytes == queue_size * 8 * 4 * (1 / 4 - 1 / 8)
    growth_with_devices = _footprint(a2a_8) - _footprint(a2a_4)  # minus the smaller queue shard
    growth_with_batch = _footprint(a2a_4_double) - _footprint(a2a_4)
    assert growth_with_batch >= local * image_bytes, (growth_with_batch, local * image_bytes)
    assert growth_with_devices <= 0.1 * growth_with_batch, (growth_with_devices, growth_with_batch)

    gather_4, gather_8 = _step_memory("all_gather", 4, local), _step_memory("all_gather", 8, local)
    gathered_images = (8 - 4) * local * image_bytes
    assert _footprint(gather_8) - _footprint(gather_4) >= 0.9 * gathered_images


def test_train_step_all_to_all_equals_all_gather_given_the_same_permutation(monkeypatch):
    """The whole step (loss, gradients, BN statistics, queue) in all_to_all
    mode equals the reference all-gather step when both draw the same
    (stratified) permutation; test_moco_step checks the all-gather step
    against a single-device reference."""
    state = state_lib.create_train_state(jax.random.key(0), _SmallEncoder(), optax.sgd(0.1), (4, 4, 3), 64, 8)
    x = np.random.default_rng(4).normal(size=(2, N_DEV, 8, 4, 4, 3)).astype(np.float32)
    batch = (sharding.shard(x[0]), sharding.shard(x[1]))

    def run(mode):
        hp = moco_v2.MoCoHParams(shuffle_mode=mode)
        step = jax.pmap(functools.partial(moco_v2.train_step, hp=hp, views=lambda rng, b: b), axis_name=hp.axis_name)
        p_state, metrics = state_lib.to_devices(state), None
        for _ in range(2):
            p_state, metrics = step(p_state, batch)
        return state_lib.from_devices(p_state), metrics

    a2a, a2a_metrics = run("all_to_all")
    monkeypatch.setattr(moco_v2, "shuffle_permutation",
                        lambda rng, b: shuffle_bn.stratified_permutation(rng, N_DEV, b // N_DEV))
    gather, gather_metrics = run("all_gather")
    np.testing.assert_allclose(np.asarray(a2a_metrics["loss"]), np.asarray(gather_metrics["loss"]), rtol=1e-6)
    for a, g in zip(jax.tree.leaves(a2a), jax.tree.leaves(gather)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(g), rtol=1e-5, atol=1e-6)


def test_auto_takes_the_all_to_all_where_the_batch_splits_over_the_devices():
    assert shuffle_bn.resolve_shuffle_mode("auto", 16, 8) == "all_to_all"
    assert shuffle_bn.resolve_shuffle_mode("auto", 4, 8) == "all_gather"  # 4 images do not split over 8 devices
    assert shuffle_bn.resolve_shuffle_mode("auto", 16, 1) == "all_gather"  # one device: nothing to exchange
    for mode in ("all_gather", "all_to_all"):
        assert shuffle_bn.resolve_shuffle_mode(mode, 16, 8) == mode

    def collectives(mode, local):
        hp = moco_v2.MoCoHParams(shuffle_mode=mode)
        step = jax.pmap(functools.partial(moco_v2.train_step, hp=hp, views=lambda rng, b: (b, b)),
                        axis_name=hp.axis_name)
        state = state_lib.create_train_state(jax.random.key(0), _SmallEncoder(), optax.sgd(0.1), (4, 4, 3), 64, 8)
        text = step.lower(state_lib.to_devices(state), sharding.shard(np.zeros((N_DEV, local, 4, 4, 3),
                                                                                np.float32))).as_text("hlo")
        return "all-to-all(" in text

    assert collectives("auto", 8) and collectives("all_to_all", 8)
    assert not collectives("auto", 4) and not collectives("all_gather", 8)
    # In the step, auto draws the stratified permutation its all-to-all needs.
    rng = jax.random.key(11)
    draw = jax.pmap(lambda r, x: moco_v2.draw_permutation(jax.random.wrap_key_data(r), moco_v2.MoCoHParams(), LOCAL),
                    axis_name="batch")
    perms = np.asarray(draw(sharding.replicate(np.asarray(jax.random.key_data(rng))), np.zeros(N_DEV)))
    np.testing.assert_array_equal(perms[0], shuffle_bn.stratified_permutation(rng, N_DEV, LOCAL))


@pytest.mark.parametrize("mode", ["all_gather", "all_to_all"])
def test_bfloat16_backbones_exchange_bfloat16_images_and_get_the_same_keys(mode):
    """A bfloat16 ResNet casts its input to bfloat16 first, so the shuffle
    moves the key images in bfloat16 (half the bytes) and every key and BN
    statistic is bit for bit what float32 images give."""
    config = tiny_config(model=dict(dtype="bfloat16"))
    encoder = methods.build_encoder(config)
    state = state_lib.create_train_state(jax.random.key(0), encoder, optax.sgd(0.1), (8, 8, 3), 64, config.embed_dim)
    x = _per_device(np.random.default_rng(3).normal(size=(GLOBAL, 8, 8, 3)).astype(np.float32))
    perm = np.asarray(shuffle_bn.stratified_permutation(jax.random.key(7), N_DEV, LOCAL))

    def keys(image_dtype):
        hp = moco_v2.MoCoHParams(shuffle_mode=mode, image_dtype=image_dtype)
        step = jax.pmap(lambda s, xs, p: moco_v2.compute_keys(s, s.momentum_params, xs, p, hp),
                        axis_name=hp.axis_name, in_axes=(None, 0, None))
        collective = "all-to-all" if mode == "all_to_all" else "all-gather"
        text = step.lower(state, x, perm).as_text("hlo")
        moved = {line.split(" = ")[1].split("[")[0] for line in text.splitlines() if f" {collective}(" in line}
        return jax.device_get(step(state, x, perm)), moved

    (k32, stats32), moved32 = keys(jnp.float32)
    (k16, stats16), moved16 = keys(jnp.bfloat16)
    assert moved32 == {"f32"} and moved16 == {"bf16", "f32"}  # the images in bfloat16, the keys back in float32
    np.testing.assert_array_equal(k16, k32)
    for a, b in zip(jax.tree.leaves(stats16), jax.tree.leaves(stats32)):
        np.testing.assert_array_equal(a, b)
    # The trainer's step moves what the backbone computes in.
    assert moco_v2.hparams(config, 10, "batch").image_dtype == jnp.bfloat16
    assert moco_v2.hparams(tiny_config(), 10, "batch").image_dtype == jnp.float32
