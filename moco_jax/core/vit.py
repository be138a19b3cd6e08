"""Vision Transformers as MoCo v3 trains them (facebookresearch/moco-v3 `vits.py`).

A timm `VisionTransformer` (pre-norm blocks, [CLS] token, LayerNorm eps 1e-6,
exact GELU, qkv with bias) with the changes MoCo v3 makes to it:

* fixed 2-D sin-cos position embeddings (not learned), zero for [CLS];
* its initialisation: xavier-uniform linears, Q, K and V treated as three
  matrices, cls_token ~ N(0, 1e-6), a xavier-uniform patch projection;
* optionally a frozen patch projection (`stop_grad_patch`, the paper's fix
  for the training instability of Sec. 4.2): it keeps its random init.

Layer names follow timm (`patch_embed/proj`, `blocks_{i}/attn/qkv`, `norm`,
...), so that the weights map one to one onto
`timm.models.vision_transformer.VisionTransformer` (moco_jax/io/torch_format.py).

Images (B, H, W, 3) -> the final-normalised [CLS] token (B, width): the
features the MoCo v3 projection head and linear probe read.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    num_heads: int


# ViT-Small/Base as in moco-v3 `vits.py` (its ViT-Small has 12 heads of 32
# dims, where timm's and DeiT's have 6 of 64: same parameters, other features).
# "tiny" is DeiT-Tiny's shape; "test" is for unit tests and CPU runs.
VIT_SIZES = {
    "test": ViTSize(width=32, depth=2, num_heads=2),
    "mini": ViTSize(width=128, depth=4, num_heads=4),
    "tiny": ViTSize(width=192, depth=12, num_heads=3),
    "small": ViTSize(width=384, depth=12, num_heads=12),
    "base": ViTSize(width=768, depth=12, num_heads=12),
}
LN_EPS = 1e-6  # timm's partial(nn.LayerNorm, eps=1e-6) in moco-v3's vits


def sincos_position_embedding(grid: int, width: int, temperature: float = 10000.0) -> np.ndarray:
    """moco-v3 `build_2d_sincos_position_embedding` for a square grid of patches.

    Returns float32 (1, 1 + grid**2, width): a zero row for [CLS], then one
    row per patch in timm's token order (row-major). As in the reference
    (torch.meshgrid's "ij" indexing), the first half of the channels encodes
    the patch's row, the second half its column: [sin, cos](row * omega),
    [sin, cos](col * omega), omega_d = temperature ** (-d / (width / 4)).
    """
    if width % 4:
        raise ConfigError(f"the ViT width ({width}) must be a multiple of 4 for 2-D sin-cos position embeddings")
    pos_dim = width // 4
    omega = 1.0 / temperature ** (np.arange(pos_dim, dtype=np.float32) / pos_dim)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    out_r = np.einsum("m,d->md", rows.reshape(-1), omega)
    out_c = np.einsum("m,d->md", cols.reshape(-1), omega)
    emb = np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)], axis=1)
    return np.concatenate([np.zeros((1, width), np.float32), emb], axis=0)[None].astype(np.float32)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def qkv_init(key, shape, dtype=jnp.float32):
    """moco-v3: Q, K and V are three (width x width) matrices for xavier:
    U(+-sqrt(6 / (width + width))) with the flax kernel (width, 3 * width)."""
    fan_in, fan_out3 = shape
    return _uniform(math.sqrt(6.0 / (fan_out3 // 3 + fan_in)))(key, shape, dtype)


xavier_uniform = nn.initializers.xavier_uniform()


class Attention(nn.Module):
    """timm's multi-head self-attention: one qkv projection, softmax in float32."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        head_dim = c // self.num_heads
        qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=qkv_init, name="qkv")(x)
        # timm: reshape(B, N, 3, heads, head_dim): channel blocks are q | k | v, heads inside each.
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, head_dim), 2, 0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, c)
        return nn.Dense(c, dtype=self.dtype, kernel_init=xavier_uniform, name="proj")(out)


class Mlp(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, kernel_init=xavier_uniform, name=name)  # noqa: E731
        y = nn.gelu(dense(self.hidden, "fc1")(x), approximate=False)  # torch nn.GELU(): the exact erf form
        return dense(x.shape[-1], "fc2")(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    num_heads: int
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=name)  # noqa: E731
        x = x + Attention(self.num_heads, self.dtype, name="attn")(norm("norm1")(x))
        return x + Mlp(self.mlp_ratio * x.shape[-1], self.dtype, name="mlp")(norm("norm2")(x))


class VisionTransformer(nn.Module):
    """ViT backbone: images (B, S, S, 3) -> [CLS] features (B, width).

    `train` is accepted for the ResNet interface; the ViT has no BN and no
    dropout (MoCo v3 trains without drop path), so it changes nothing.
    """

    size: str = "small"
    patch_size: int = 16
    stop_grad_patch: bool = False
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # recompute each block in the backward pass (models.REMAT)

    @property
    def spec(self) -> ViTSize:
        if self.size not in VIT_SIZES:
            raise ConfigError(f"model.vit={self.size!r} must be one of {', '.join(map(repr, VIT_SIZES))}")
        return VIT_SIZES[self.size]

    @property
    def feature_dim(self) -> int:
        return self.spec.width

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        spec, p = self.spec, self.patch_size
        if x.shape[1] != x.shape[2] or x.shape[1] % p:
            raise ConfigError(f"the ViT needs square images whose side is a multiple of patch_size={p}, "
                              f"got {x.shape[1]}x{x.shape[2]}")
        patch_bound = math.sqrt(6.0 / (3 * p * p + spec.width))  # xavier, with the conv as a (3*p*p, width) matrix
        patches = PatchEmbed(spec.width, p, patch_bound, self.stop_grad_patch, self.dtype, name="patch_embed")(
            x.astype(self.dtype))  # (B, N, width)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, spec.width), jnp.float32)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, spec.width)).astype(self.dtype), patches], 1)
        # Fixed, not a parameter: nothing can train it, and checkpoints need not hold it.
        tokens = tokens + jnp.asarray(sincos_position_embedding(x.shape[1] // p, spec.width), self.dtype)
        block = nn.remat(Block) if self.remat else Block  # the same parameter names either way
        for i in range(spec.depth):
            tokens = block(spec.num_heads, dtype=self.dtype, name=f"blocks_{i}")(tokens)
        tokens = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(tokens)
        return tokens[:, 0].astype(jnp.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> (B, N, width) via a strided conv (`proj`)."""

    width: int
    patch_size: int
    bound: float
    stop_grad: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        kernel = self.param("kernel", _uniform(self.bound), (p, p, x.shape[-1], self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
        if self.stop_grad:
            # No gradient reaches it; the optimizer also leaves it untouched
            # (moco_jax/core/optim.py `frozen_mask`), weight decay included.
            kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
        y = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (p, p), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + bias.astype(self.dtype)
        return y.reshape(y.shape[0], -1, self.width)  # row-major tokens, as timm's flatten(2)
