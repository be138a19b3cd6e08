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

from moco_jax.core import vit
from moco_jax.core.config import BOOL, MOMENTUM, integer, one_of
from moco_jax.core.errors import ConfigError

Dtype = Any

# PyTorch initialisers, so that a model trained here starts like the reference.
# PyTorch's default for Linear and Conv2d weights, kaiming_uniform_(a=sqrt(5)),
# is U(+-1/sqrt(fan_in)); every linear layer here uses it.
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# `model.conv_init`, applied to every ResNet convolution (stem, blocks, downsample):
# * "torchvision": kaiming_normal_(mode="fan_out", nonlinearity="relu"), what
#   torchvision's ResNet does and the official MoCo code inherits:
#   N(0, 2 / (out_channels * k * k)).
# * "pytorch": a bare `nn.Conv2d`'s default, kaiming_uniform_(a=sqrt(5)), i.e.
#   U(+-1/sqrt(in_channels * k * k)). For the same-width 3x3 convolutions this
#   is sqrt(6) = 2.45 times smaller in standard deviation. Every convolution
#   here is followed by BN, so the forward pass does not depend on the
#   weights' scale, but SGD's effective step on a weight w is about lr/|w|^2:
#   smaller weights learn faster (see BENCHMARKS.md, "Convolution init").
CONV_INITS = {
    "torchvision": nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    "pytorch": dense_init,  # the same default as PyTorch's Linear
}


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
    affine: bool = True  # False: no scale and bias (PyTorch's BatchNorm1d(affine=False))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        if self.affine:
            scale = self.param("scale", self.scale_init, (features,), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        else:
            scale, bias = 1.0, 0.0
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


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str, init: str = "torchvision") -> nn.Conv:
    """A bias-free convolution; `init` names its kernel initialiser in CONV_INITS."""
    if init not in CONV_INITS:
        raise ConfigError(f"model.conv_init={init!r} must be one of {', '.join(map(repr, CONV_INITS))}")
    pad = kernel // 2  # PyTorch pads symmetrically; Flax's "SAME" does not for stride 2.
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=CONV_INITS[init],
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Output channels: `filters`.

    `zero_init_residual`: the last BN's scale starts at zero, so the block
    starts as the identity (torchvision's option, which MoCo v3 sets)."""

    filters: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Dtype = jnp.float32
    zero_init_residual: bool = False
    conv_init: str = "torchvision"
    expansion = 1

    @nn.compact
    def __call__(self, x):
        y = _conv(self.filters, 3, self.stride, self.dtype, "conv1", self.conv_init)(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _conv(self.filters, 3, 1, self.dtype, "conv2", self.conv_init)(y)
        y = self.norm(name="bn2", scale_init=_last_bn_init(self))(y)
        return nn.relu(y + _shortcut(self, x, self.filters))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, torchvision "v1.5") -> 1x1 x4 (ResNet-50)."""

    filters: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Dtype = jnp.float32
    zero_init_residual: bool = False
    conv_init: str = "torchvision"
    expansion = 4

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(_conv, dtype=self.dtype, init=self.conv_init)
        y = nn.relu(self.norm(name="bn1")(conv(self.filters, 1, 1, name="conv1")(x)))
        y = nn.relu(self.norm(name="bn2")(conv(self.filters, 3, self.stride, name="conv2")(y)))
        y = self.norm(name="bn3", scale_init=_last_bn_init(self))(conv(self.filters * 4, 1, 1, name="conv3")(y))
        return nn.relu(y + _shortcut(self, x, self.filters * 4))


def _last_bn_init(block: nn.Module) -> Callable:
    return nn.initializers.zeros if block.zero_init_residual else nn.initializers.ones


def _shortcut(block: nn.Module, x: jax.Array, out_features: int) -> jax.Array:
    """Identity, or a strided 1x1 conv + BN when the shape changes."""
    if block.stride == 1 and x.shape[-1] == out_features:
        return x
    # Called inside the block's compact __call__, so these layers belong to it.
    conv = _conv(out_features, 1, block.stride, block.dtype, "downsample_conv", block.conv_init)
    return block.norm(name="downsample_bn")(conv(x))


ARCHITECTURES: dict[int, tuple[Sequence[int], type]] = {
    10: ((1, 1, 1, 1), BasicBlock),  # a small variant for tests and CPU demos
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), Bottleneck),
}


STEMS = ("imagenet", "cifar")
# model.remat: "blocks" recomputes each residual block's (ResNet) or transformer
# block's (ViT) activations in the backward pass from the block's input, which
# is all that is kept (nn.remat's default policy: nothing inside saveable); about
# one more forward of the backbone per step, for activation memory that no longer
# grows with the depth. The heads are not rematerialised.
REMAT = ("none", "blocks")
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
    zero_init_residual: bool = False
    conv_init: str = "torchvision"  # CONV_INITS
    remat: bool = False  # recompute each block in the backward pass (REMAT)

    @property
    def feature_dim(self) -> int:
        _, block = ARCHITECTURES[self.depth]
        return self.width * 8 * block.expansion

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        stages, block = ARCHITECTURES[self.depth]
        block = nn.remat(block) if self.remat else block  # the same parameter names either way
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
            x = nn.relu(norm(name="bn1")(_conv(self.width, 7, 2, self.dtype, "conv1", self.conv_init)(x)))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "cifar":
            x = nn.relu(norm(name="bn1")(_conv(self.width, 3, 1, self.dtype, "conv1", self.conv_init)(x)))
        else:
            raise ConfigError(f"model.stem={self.stem!r} must be one of {', '.join(map(repr, STEMS))}")
        for i, num_blocks in enumerate(stages):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = block(self.width * 2**i, stride, norm, self.dtype, self.zero_init_residual, self.conv_init,
                          name=f"layer{i + 1}_{j}")(x)
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


class MLPHead(nn.Module):
    """MoCo v3's projector / predictor (`MoCo._build_mlp`): `num_layers`
    bias-free linears; BN + ReLU after each hidden one, and after the last a
    BN without scale and bias if `last_bn` (SimCLR's design, gamma removed).

    `axis_name` set: the BNs are SyncBN over that pmap axis, as the official
    code's `convert_sync_batchnorm` makes them. In: (B, D); out (B, out_dim)."""

    num_layers: int
    hidden_dim: int
    out_dim: int
    last_bn: bool = True
    axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(SplitBatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 axis_name=self.axis_name if train else None, dtype=self.dtype)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False, dtype=self.dtype,
                         param_dtype=jnp.float32, kernel_init=dense_init, name=f"fc{i}")(x)
            if not last:
                x = nn.relu(norm(name=f"bn{i}")(x))
            elif self.last_bn:
                x = norm(affine=False, name=f"bn{i}")(x)
        return x.astype(jnp.float32)


class MoCoEncoder(nn.Module):
    """Backbone + projection head: images -> (features (B, D), projection (B, embed_dim)).

    The MoCo v1/v2 encoder (the key encoder has the same shape); `query` is
    the same call, so that both methods' steps read alike."""

    backbone: nn.Module
    head: ProjectionHead

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        features = self.backbone(x, train=train)
        return features, self.head(features)

    def query(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        return self(x, train)


class MoCoV3Encoder(nn.Module):
    """MoCo v3: backbone + projector, and the predictor on the query side.

    `__call__` is the momentum encoder's function (and the one evaluation
    uses): images -> (features (B, D), projection (B, embed_dim)). `query`
    adds the predictor: images -> (features, prediction (B, embed_dim)). The
    momentum encoder's parameters are `momentum_subset(params)`: everything
    but the predictor's."""

    backbone: nn.Module
    head: MLPHead
    predictor: MLPHead

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        features = self.backbone(x, train=train)
        return features, self.head(features, train=train)

    def query(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        features, z = self(x, train)
        return features, self.predictor(z, train=train)


ARCHS = ("resnet", "vit")


def is_vit(config) -> bool:
    """Whether `config.model` is a ViT."""
    return config.model.arch == "vit"


def describe_backbone(config) -> str:
    """The backbone in words, e.g. 'ResNet-10 (width 16, cifar stem)' or 'ViT-small/16'."""
    model = config.model
    if is_vit(config):
        return f"ViT-{model.vit}/{model.patch_size}"
    return f"ResNet-{model.depth} (width {model.width}, {model.stem} stem)"


def build_backbone(config, axis_name: str = "batch") -> nn.Module:
    """`config.model.arch`: a ResNet (`model.depth`, `width`, `stem`,
    `sync_bn`, `zero_init_residual`, `conv_init`; `config.bn_splits`) or a
    ViT (`model.vit`, `patch_size`, `stop_grad_patch`); activations in
    `model.dtype`."""
    model_config = config.model
    if model_config.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={model_config.dtype!r} must be one of {', '.join(map(repr, DTYPES))}")
    dtype = DTYPES[model_config.dtype]
    if is_vit(config):
        return vit.VisionTransformer(size=model_config.vit, patch_size=model_config.patch_size,
                                     stop_grad_patch=model_config.stop_grad_patch, dtype=dtype,
                                     remat=model_config.remat == "blocks", name="backbone")
    if model_config.arch != "resnet":
        raise ConfigError(f"model.arch={model_config.arch!r} must be one of {', '.join(map(repr, ARCHS))}")
    return ResNet(
        depth=model_config.depth,
        width=model_config.width,
        stem=model_config.stem,
        bn_splits=config.bn_splits,
        bn_axis_name=axis_name if model_config.sync_bn else None,
        bn_momentum=model_config.bn_momentum,
        dtype=dtype,
        zero_init_residual=model_config.zero_init_residual,
        conv_init=model_config.conv_init,
        remat=model_config.remat == "blocks",
        name="backbone",
    )


def frozen_prefixes(config) -> tuple[tuple[str, ...], ...]:
    """The parameter paths no optimizer step may change: the ViT patch
    projection with `model.stop_grad_patch` (moco-v3's `--stop-grad-conv1`)."""
    return (("backbone", "patch_embed"),) if is_vit(config) and config.model.stop_grad_patch else ()


# ---------------------------------------------------------------------------
# The `model.*` fields: what each may hold, which encoder reads it, and the
# relations a config's encoder must satisfy.
# ---------------------------------------------------------------------------
FIELDS = {
    "model.arch": one_of(ARCHS), "model.dtype": one_of(DTYPES), "model.sync_bn": BOOL,
    "model.bn_momentum": MOMENTUM, "model.remat": one_of(REMAT),
    # ResNet
    "model.depth": one_of(ARCHITECTURES), "model.width": integer(1), "model.stem": one_of(STEMS),
    "model.zero_init_residual": BOOL, "model.conv_init": one_of(CONV_INITS),
    # ViT
    "model.vit": one_of(vit.VIT_SIZES), "model.patch_size": integer(1), "model.stop_grad_patch": BOOL,
}
SHAPE_FIELDS = ("model.arch", "model.depth", "model.width", "model.stem", "model.vit", "model.patch_size")
# Fields that only one kind of encoder reads: (does this config's encoder read them?, which encoder, what instead).
ONLY_FOR = {
    **dict.fromkeys(("model.depth", "model.width", "model.stem", "model.zero_init_residual", "model.conv_init"),
                    (lambda c: not is_vit(c), "a ResNet encoder",
                     f"model.arch='vit' is sized by model.vit ({' | '.join(vit.VIT_SIZES)}) and model.patch_size")),
    **dict.fromkeys(("model.vit", "model.patch_size", "model.stop_grad_patch"),
                    (is_vit, "a ViT encoder (model.arch='vit')", "a ResNet is sized by model.depth and model.width")),
}


def check(config) -> None:
    """A ViT tiles its crops into whole patches and keeps MoCo v3's patch init."""
    if is_vit(config) and config.model.conv_init != "torchvision":
        raise ConfigError(f"model.conv_init={config.model.conv_init!r} applies to ResNet convolutions only: the "
                          "ViT's patch projection keeps MoCo v3's xavier init (leave model.conv_init='torchvision')")
    if is_vit(config) and config.crop_size % config.model.patch_size:
        raise ConfigError(f"crop_size={config.crop_size} must be a multiple of model.patch_size="
                          f"{config.model.patch_size}: the ViT cuts the crop into whole patches")


def every_conv_followed_by_bn(config) -> bool:
    """Whether every convolution kernel of the encoder feeds a BN (a ResNet,
    not a ViT): what `conv_grad_scale` relies on."""
    return not is_vit(config)


def momentum_subset(tree: dict[str, Any]) -> dict[str, Any]:
    """The part of a params (or batch_stats) tree the momentum encoder has:
    all but MoCo v3's predictor."""
    return {k: v for k, v in tree.items() if k != "predictor"}


def backbone_variables(variables: dict[str, Any]) -> dict[str, Any]:
    """The backbone's {"params", "batch_stats"} out of encoder variables: what
    export, the linear probe and `Encoder.embed` run (a ViT has no BN, so
    its "batch_stats" are empty)."""
    return {"params": variables["params"]["backbone"],
            "batch_stats": variables.get("batch_stats", {}).get("backbone", {})}
