"""ResNet shapes, split BN, SyncBN, bfloat16 and the convolution inits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moco_jax.core import models
from moco_jax import methods
from tiny import tiny_config


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_split_bn_with_one_split_is_flax_batchnorm():
    x = _x((6, 5, 5, 3)) * 3 + 1
    ours = models.SplitBatchNorm(use_running_average=False)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    v_ours, v_ref = ours.init(jax.random.key(0), x), ref.init(jax.random.key(0), x)
    y, s = ours.apply(v_ours, x, mutable=["batch_stats"])
    y_ref, s_ref = ref.apply(v_ref, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(s["batch_stats"][name], s_ref["batch_stats"][name], rtol=1e-5, atol=1e-6)


def test_split_bn_on_one_device_equals_per_device_bn_on_eight():
    config = tiny_config(bn_splits=8)
    split_encoder = methods.build_encoder(config)
    device_encoder = methods.build_encoder(tiny_config(bn_splits=1))
    x = _x((32, 8, 8, 3))
    variables = split_encoder.init(jax.random.key(1), x, train=False)

    train_apply = lambda enc: jax.jit(lambda v, x: enc.apply(v, x, train=True, mutable=["batch_stats"]))  # noqa: E731
    (_, z_split), s_split = train_apply(split_encoder)(variables, x)

    def per_device(xd):
        (_, z), s = device_encoder.apply(variables, xd, train=True, mutable=["batch_stats"])
        return z, jax.lax.pmean(s, "batch")  # what the train step does to keep replicas equal

    z_dev, s_dev = jax.pmap(per_device, axis_name="batch")(x.reshape(8, 4, 8, 8, 3))
    np.testing.assert_allclose(z_split, np.asarray(z_dev).reshape(32, -1), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_split), jax.tree.leaves(s_dev)):
        np.testing.assert_allclose(a, np.asarray(b)[0], rtol=1e-4, atol=1e-6)
    # And it is not plain BN over the whole batch.
    (_, z_whole), _ = train_apply(device_encoder)(variables, x)
    assert np.abs(np.asarray(z_whole) - np.asarray(z_split)).max() > 1e-3


def test_sync_bn_equals_bn_over_the_global_batch():
    x = _x((16, 4, 4, 3)) * 2 - 1
    sync = models.SplitBatchNorm(axis_name="batch")
    whole = models.SplitBatchNorm()
    v = whole.init(jax.random.key(0), x)
    y_whole, _ = whole.apply(v, x, mutable=["batch_stats"])
    y_sync = jax.pmap(lambda xd: sync.apply(v, xd, mutable=["batch_stats"])[0], axis_name="batch")(
        x.reshape(8, 2, 4, 4, 3)
    )
    np.testing.assert_allclose(np.asarray(y_sync).reshape(x.shape), y_whole, atol=1e-4)


@pytest.mark.parametrize(
    "depth,stem,size,feature_dim",
    [(18, "imagenet", 32, 32), (34, "cifar", 8, 32), (50, "imagenet", 32, 128), (10, "cifar", 8, 32)],
)
def test_resnet_shapes(depth, stem, size, feature_dim):
    model = models.ResNet(depth=depth, width=4, stem=stem)
    x = _x((2, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (2, feature_dim) == (2, model.feature_dim)
    # Standard parameter counts at width 64 (torchvision, without the fc layer).
    blocks = [k for k in variables["params"] if k.startswith("layer")]
    assert len(blocks) == sum(models.ARCHITECTURES[depth][0])


@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (50, 23_508_032)])
def test_parameter_counts_match_torchvision(depth, expected):
    """torchvision resnet18/50 minus the 1000-way fc: 11,689,512 - 513,000 and
    25,557,032 - 2,049,000."""
    model = models.ResNet(depth=depth, width=64, stem="imagenet")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == expected


def test_heads():
    feats = _x((3, 32))
    for kind, names in (("linear", {"fc"}), ("mlp", {"fc1", "fc2"})):
        head = models.ProjectionHead(kind=kind, embed_dim=7)
        v = head.init(jax.random.key(0), feats)
        assert set(v["params"]) == names
        assert head.apply(v, feats).shape == (3, 7)
    v = models.ProjectionHead(kind="mlp", embed_dim=7).init(jax.random.key(0), feats)
    assert v["params"]["fc1"]["kernel"].shape == (32, 32)  # hidden = backbone width


def test_bfloat16_compute_keeps_float32_params_and_stats():
    config = tiny_config()
    config.model.dtype = "bfloat16"
    encoder = methods.build_encoder(config)
    x = _x((4, 8, 8, 3))
    variables = encoder.init(jax.random.key(0), x, train=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    (feats, z), stats = jax.jit(lambda v: encoder.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats))
    assert z.dtype == jnp.float32  # embeddings are normalised in float32
    jaxpr = str(jax.make_jaxpr(lambda v: encoder.apply(v, x, train=False))(variables))
    assert "bf16" in jaxpr  # the convolutions really run in bfloat16
    config.model.dtype = "float32"
    encoder32 = methods.build_encoder(config)
    (_, z32), _ = jax.jit(lambda v: encoder32.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    assert np.abs(np.asarray(z32) - np.asarray(z)).max() < 0.1 * np.abs(np.asarray(z32)).max()


def _conv_kernels(params, prefix=()):
    """(path, kernel) of every convolution (4-d kernel) in a params tree."""
    for name, value in params.items():
        if isinstance(value, dict):
            yield from _conv_kernels(value, prefix + (name,))
        elif name == "kernel" and value.ndim == 4:
            yield "/".join(prefix), np.asarray(value)


@pytest.mark.parametrize("depth", [18, 50])
def test_conv_init_reaches_every_convolution(depth):
    """torchvision: N(0, 2 / fan_out); pytorch (nn.Conv2d's default):
    U(+-1 / sqrt(fan_in)). Checked on every convolution, stem, blocks and
    downsample alike, by the bound and the standard deviation."""
    kernels = {}
    for init in ("torchvision", "pytorch"):
        model = models.ResNet(depth=depth, width=16, stem="imagenet", conv_init=init)
        params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
        kernels[init] = dict(_conv_kernels(params))
    assert kernels["torchvision"].keys() == kernels["pytorch"].keys()
    assert len(kernels["pytorch"]) == {18: 20, 50: 53}[depth]
    assert any("downsample_conv" in path for path in kernels["pytorch"])
    for path, w in kernels["pytorch"].items():
        kh, kw, cin, cout = w.shape
        bound = 1 / np.sqrt(kh * kw * cin)
        assert np.abs(w).max() <= bound, path
        if w.size >= 2000:  # enough draws for the spread to be tight
            assert w.std() == pytest.approx(bound / np.sqrt(3), rel=0.1), path
    for path, w in kernels["torchvision"].items():
        kh, kw, cin, cout = w.shape
        if w.size >= 2000:
            assert w.std() == pytest.approx(np.sqrt(2 / (kh * kw * cout)), rel=0.1), path
    # Same-width 3x3 convolutions: the PyTorch default is sqrt(6) = 2.45x smaller.
    same = "layer1_0/conv2"
    ratio = kernels["torchvision"][same].std() / kernels["pytorch"][same].std()
    assert ratio == pytest.approx(np.sqrt(6), rel=0.1)


def test_conv_init_from_the_config():
    config = tiny_config()
    config.model.conv_init = "pytorch"
    backbone = models.build_backbone(config)
    assert backbone.conv_init == "pytorch"
    params = backbone.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)["params"]
    w = np.asarray(params["layer1_0"]["conv1"]["kernel"])
    assert np.abs(w).max() <= 1 / np.sqrt(w.shape[0] * w.shape[1] * w.shape[2])
    config.model.conv_init = "orthogonal"
    with pytest.raises(models.ConfigError, match="model.conv_init='orthogonal' must be one of"):
        models.build_backbone(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


def _sgd_steps(config, grad_fn, params, batch_stats, steps=3):
    """`steps` steps of `make_optimizer(config)`; grad_fn(params, batch_stats)
    -> ((loss, new batch_stats), grads)."""
    from moco_jax.core import optim

    tx, _ = optim.make_optimizer(config, steps_per_epoch=steps)
    opt_state = tx.init(params)
    for _ in range(steps):
        (_, batch_stats), grads = grad_fn(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def _kernel_gaps(a, b, scale):
    """Per leaf: max |a / scale - b| / max |b|."""
    return [float(np.abs(np.asarray(x) / s - np.asarray(y)).max() / np.abs(np.asarray(y)).max())
            for x, s, y in zip(jax.tree.leaves(a), jax.tree.leaves(scale), jax.tree.leaves(b))]


def test_conv_grad_scale_is_the_init_at_pytorch_scale():
    """conv_grad_scale='pytorch_init' (kernel gradients x c^2 = 6 * I / O)
    from the torchvision init w0 trains, under BN, like the plain run from
    w0 / c (the torchvision draw at PyTorch's default standard deviation):
    after 3 SGD steps (momentum, coupled decay) every kernel is c times the
    other run's and every BN parameter equal, to BN's eps (which breaks the
    scale invariance by ~1e-3 here). Without the scale the runs part by 14%."""
    config = tiny_config(learning_rate=0.4, weight_decay=5e-3)  # a step of lr 0.4 * 16 / 256 = 0.025
    backbone = models.build_backbone(config)
    x = _x((16, 8, 8, 3))
    variables = backbone.init(jax.random.key(0), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    target = 0.5 * jnp.asarray(np.random.default_rng(1).normal(size=(backbone.feature_dim,)), jnp.float32)

    @jax.jit
    def grad_fn(p, batch_stats):  # a loss of the train-mode features: BN after every convolution
        def loss_fn(p, batch_stats):
            features, new = backbone.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                           mutable=["batch_stats"])
            return jnp.mean((features - target) ** 2), new["batch_stats"]
        return jax.value_and_grad(loss_fn, has_aux=True)(p, batch_stats)

    c = jax.tree.map(lambda p: np.sqrt(6 * p.shape[2] / p.shape[3]) if p.ndim == 4 else 1.0, params)
    assert {float(v) for v in jax.tree.leaves(c)} > {np.sqrt(6.0), 1.0}  # widths change: 6 * I / O varies
    small = jax.tree.map(lambda p, s: p / s, params, c)
    plain = _sgd_steps(config, grad_fn, small, stats)
    moved = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(small))
             if a.ndim == 4]
    assert min(moved) > 1e-2  # the steps changed every kernel
    config.conv_grad_scale = "pytorch_init"
    assert max(_kernel_gaps(_sgd_steps(config, grad_fn, params, stats), plain, c)) < 1e-2
    config.conv_grad_scale = "none"  # the control
    assert max(_kernel_gaps(_sgd_steps(config, grad_fn, params, stats), plain, c)) > 7e-2


def test_conv_grad_scale_needs_sgd_on_a_resnet():
    from moco_jax.core import optim
    from moco_jax.training.checks import validate_config

    config = tiny_config(conv_grad_scale="pytorch_init", optimizer="lars")
    with pytest.raises(models.ConfigError, match="conv_grad_scale='pytorch_init' needs a ResNet trained with"):
        validate_config(config, num_devices=8)
    with pytest.raises(models.ConfigError, match="needs optimizer='sgd'"):
        optim.make_optimizer(config, steps_per_epoch=4)
    with pytest.raises(models.ConfigError, match="must be one of 'none', 'pytorch_init'"):
        validate_config(tiny_config(conv_grad_scale="6"), num_devices=8)
