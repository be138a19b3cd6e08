"""ResNet encoders and MoCo projection heads (flax.linen).

Layer names follow torchvision (`conv1`, `bn1`, `layer1_0`, `downsample_conv`,
...), and convolutions use PyTorch's symmetric padding, so that weights map one
to one onto `torchvision.models.resnet*` for export.

BatchNorm convention: a PyTorch BN with `momentum=0.1` (the default, used by
MoCo) updates `running = 0.9 * running + 0.1 * batch`; Flax writes the same
update with `momentum=0.9`. Everywhere in this package `bn_momentum` is the
Flax value, 0.9.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moco_jax.core.errors import ConfigError

Dtype = Any

# PyTorch initialisers, so that a model trained here starts like the reference.
# Conv: kaiming_normal_(mode="fan_out", nonlinearity="relu") as in torchvision.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Linear: PyTorch's default kaiming_uniform_(a=sqrt(5)) is U(+-1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_dense_bias_init(fan_in: int):
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SplitBatchNorm(nn.Module):
    """BatchNorm over `num_splits` groups of the batch, optionally synced.

    In train mode the batch (B, ..., C) is cut into `num_splits` contiguous
    groups of B / num_splits examples, and each group is normalised with its own
    mean and variance. With `num_splits=1` this is ordinary per-device BN
    (MoCo's default); with `num_splits=n` one device computes exactly what n
    devices holding one group each would, which is how the official
    single-GPU CIFAR demo emulates multi-GPU shuffle BN. (The demo groups
    examples with stride `num_splits`; we group contiguous examples, which
    matches how a batch is split over devices. Keys are shuffled before BN, so
    the two groupings are equally random.)

    With `axis_name` set, means and second moments are averaged over that pmap
    axis first: cross-device SyncBN.

    Statistics are always computed in float32, whatever `dtype` the
    activations use. The running variance is the biased batch variance (Flax's
    convention; PyTorch stores the unbiased one, a factor B/(B-1) apart).
    Running statistics are the average of the groups' statistics, as in the
    demo's SplitBatchNorm.
    """

    use_running_average: bool = False
    num_splits: int = 1
    axis_name: str | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
            return (y * scale + bias).astype(self.dtype)

        groups = x.astype(jnp.float32).reshape((self.num_splits, -1) + x.shape[1:])
        reduce_axes = tuple(range(1, groups.ndim - 1))
        mean = groups.mean(reduce_axes, keepdims=True)
        if self.axis_name is None:
            var = jnp.square(groups - mean).mean(reduce_axes, keepdims=True)
        else:
            mean_sq = jnp.square(groups).mean(reduce_axes, keepdims=True)
            mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
        y = (groups - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y.reshape(x.shape) * scale + bias

        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(-1, features).mean(0)
            ra_var.value = m * ra_var.value + (1 - m) * var.reshape(-1, features).mean(0)
        return y.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
    pad = kernel // 2  # PyTorch pads symmetrically; Flax's "SAME" does not for stride 2.
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Output channels: `filters`."""

    filters: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x):
        y = _conv(self.filters, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _conv(self.filters, 3, 1, self.dtype, "conv2")(y)
        y = self.norm(name="bn2")(y)
        return nn.relu(y + _shortcut(self, x, self.filters))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, torchvision "v1.5") -> 1x1 x4 (ResNet-50)."""

    filters: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm(name="bn1")(_conv(self.filters, 1, 1, self.dtype, "conv1")(x)))
        y = nn.relu(self.norm(name="bn2")(_conv(self.filters, 3, self.stride, self.dtype, "conv2")(y)))
        y = self.norm(name="bn3")(_conv(self.filters * 4, 1, 1, self.dtype, "conv3")(y))
        return nn.relu(y + _shortcut(self, x, self.filters * 4))


def _shortcut(block: nn.Module, x: jax.Array, out_features: int) -> jax.Array:
    """Identity, or a strided 1x1 conv + BN when the shape changes."""
    if block.stride == 1 and x.shape[-1] == out_features:
        return x
    # Called inside the block's compact __call__, so these layers belong to it.
    conv = _conv(out_features, 1, block.stride, block.dtype, "downsample_conv")
    return block.norm(name="downsample_bn")(conv(x))


ARCHITECTURES: dict[int, tuple[Sequence[int], type]] = {
    10: ((1, 1, 1, 1), BasicBlock),  # a small variant for tests and CPU demos
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), Bottleneck),
}


STEMS = ("imagenet", "cifar")
HEADS = ("linear", "mlp")
# model.dtype -> the activations' dtype (params and BN statistics stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ResNet(nn.Module):
    """ResNet backbone: images (B, H, W, 3) -> pooled features (B, feature_dim).

    `stem="imagenet"`: 7x7/2 conv + 3x3/2 max-pool. `stem="cifar"`: one 3x3/1
    conv and no max-pool (the official MoCo CIFAR demo). `width` is the number
    of filters of the first stage (64 in the standard models); stages double it.
    """

    depth: int = 50
    width: int = 64
    stem: str = "imagenet"
    bn_splits: int = 1
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        _, block = ARCHITECTURES[self.depth]
        return self.width * 8 * block.expansion

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        stages, block = ARCHITECTURES[self.depth]
        norm = functools.partial(
            SplitBatchNorm,
            use_running_average=not train,
            num_splits=self.bn_splits if train else 1,
            axis_name=self.bn_axis_name if train else None,
            momentum=self.bn_momentum,
            dtype=self.dtype,
        )
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.relu(norm(name="bn1")(_conv(self.width, 7, 2, self.dtype, "conv1")(x)))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "cifar":
            x = nn.relu(norm(name="bn1")(_conv(self.width, 3, 1, self.dtype, "conv1")(x)))
        else:
            raise ConfigError(f"model.stem={self.stem!r} must be one of {', '.join(map(repr, STEMS))}")
        for i, num_blocks in enumerate(stages):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = block(self.width * 2**i, stride, norm, self.dtype, name=f"layer{i + 1}_{j}")(x)
        return x.astype(jnp.float32).mean(axis=(1, 2))


class ProjectionHead(nn.Module):
    """MoCo v1 `linear`: fc -> embed_dim. MoCo v2 `mlp`: fc1 (hidden = input
    width) -> ReLU -> fc2 -> embed_dim. Output (B, embed_dim), not normalised."""

    kind: str = "mlp"
    embed_dim: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=dense_init)
        in_dim = x.shape[-1]
        if self.kind == "linear":
            x = dense(self.embed_dim, bias_init=_torch_dense_bias_init(in_dim), name="fc")(x)
        elif self.kind == "mlp":
            x = nn.relu(dense(in_dim, bias_init=_torch_dense_bias_init(in_dim), name="fc1")(x))
            x = dense(self.embed_dim, bias_init=_torch_dense_bias_init(in_dim), name="fc2")(x)
        else:
            raise ConfigError(f"model.head={self.kind!r} must be one of {', '.join(map(repr, HEADS))}")
        return x.astype(jnp.float32)


class MoCoEncoder(nn.Module):
    """Backbone + projection head: images -> (features (B, D), projection (B, embed_dim))."""

    backbone: ResNet
    head: ProjectionHead

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        features = self.backbone(x, train=train)
        return features, self.head(features)


def build_encoder(config, axis_name: str = "batch") -> MoCoEncoder:
    """The encoder of an experiment config (`config.model`, `config.embed_dim`,
    `config.bn_splits`); SyncBN reduces over the pmap axis `axis_name`."""
    model_config = config.model
    if model_config.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={model_config.dtype!r} must be one of {', '.join(map(repr, DTYPES))}")
    dtype = DTYPES[model_config.dtype]
    backbone = ResNet(
        depth=model_config.depth,
        width=model_config.width,
        stem=model_config.stem,
        bn_splits=config.bn_splits,
        bn_axis_name=axis_name if model_config.sync_bn else None,
        bn_momentum=model_config.bn_momentum,
        dtype=dtype,
        name="backbone",
    )
    # The head stays in float32 even for bfloat16 backbones: it is tiny, and
    # the embeddings are divided by T (as small as 0.07) in the logits, where
    # bfloat16's 3 significant digits would show.
    head = ProjectionHead(kind=model_config.head, embed_dim=config.embed_dim, dtype=jnp.float32, name="head")
    return MoCoEncoder(backbone=backbone, head=head)


def backbone_variables(variables: dict[str, Any]) -> dict[str, Any]:
    """The ResNet's {"params", "batch_stats"} out of `MoCoEncoder` variables:
    what export, the linear probe and `Encoder.embed` run."""
    return {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}
