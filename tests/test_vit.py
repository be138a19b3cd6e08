"""The MoCo v3 ViT: position embeddings and initialisation as moco-v3's
`vits.py`, the timm-layout export, and PyTorch parity against a ViT written
here with timm's module names (timm needs torchvision, which does not
install beside this environment's CPU PyTorch); those tests skip without PyTorch."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from configs import moco_v3_tiny
from moco_jax import pretrained
from moco_jax.core import vit
from moco_jax.eval import embed
from moco_jax.io import formats, torch_format
from moco_jax import methods

SIZE = 16


def _config(**model):
    config = moco_v3_tiny.get_config()
    config.crop_size = SIZE
    config.model.update(model)
    return config


def _variables(config, seed=0):
    """Initialised variables, with every parameter perturbed (so that zero
    biases and unit LayerNorm scales are tested as arbitrary values)."""
    v = methods.build_encoder(config).init(jax.random.key(seed), jnp.zeros((2, SIZE, SIZE, 3)), train=False,
                                          method="query")
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def test_position_embedding_is_moco_v3s():
    """moco-v3 `build_2d_sincos_position_embedding`, written out as loops:
    meshgrid(w, h) with "ij" indexing, so token m = r * grid + c carries
    (sin, cos)(r * omega) then (sin, cos)(c * omega)."""
    grid, width = 3, 8
    pos_dim = width // 4
    omega = [1.0 / 10000 ** (d / pos_dim) for d in range(pos_dim)]
    expected = np.zeros((1 + grid * grid, width))
    for r in range(grid):
        for c in range(grid):
            m = 1 + r * grid + c
            expected[m] = ([math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega]
                           + [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega])
    np.testing.assert_allclose(vit.sincos_position_embedding(grid, width)[0], expected, atol=1e-6)


def test_initialisation_is_moco_v3s():
    config = _config(vit="test")
    params = jax.jit(lambda r: methods.build_encoder(config).init(
        r, jnp.zeros((2, SIZE, SIZE, 3)), train=False, method="query"))(jax.random.key(0))["params"]["backbone"]
    width, p = 32, 4
    qkv = np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"])
    assert qkv.shape == (width, 3 * width)
    bound = math.sqrt(6 / (width + width))  # Q, K, V as three square matrices
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
    fc1 = np.asarray(params["blocks_0"]["mlp"]["fc1"]["kernel"])
    assert np.abs(fc1).max() <= math.sqrt(6 / (width + 4 * width))  # xavier over (in, out)
    patch = np.asarray(params["patch_embed"]["kernel"])
    patch_bound = math.sqrt(6 / (3 * p * p + width))
    assert patch.shape == (p, p, 3, width) and patch_bound * 0.9 < np.abs(patch).max() <= patch_bound
    assert np.abs(np.asarray(params["cls_token"])).max() < 1e-5
    for leaf in (params["patch_embed"]["bias"], params["blocks_0"]["attn"]["qkv"]["bias"],
                 params["blocks_1"]["mlp"]["fc2"]["bias"]):
        assert not np.asarray(leaf).any()
    assert "pos_embed" not in params  # fixed: computed, not trained


def test_v3_heads_follow_the_official_builder():
    """ViT: a 3-layer projector and a predictor ending in an affine-free BN;
    ResNet: a 2-layer projector and a predictor without the last BN."""
    for arch, projector_layers, predictor_bn in (("vit", 3, True), ("resnet", 2, False)):
        config = _config(arch=arch)
        v = jax.eval_shape(lambda c=config: methods.build_encoder(c).init(  # structure only
            jax.random.key(0), jnp.zeros((2, SIZE, SIZE, 3)), train=False, method="query"))
        head = v["params"]["head"]
        assert "predictor" in v["params"]
        assert sorted(k for k in head if k.startswith("fc")) == [f"fc{i}" for i in range(projector_layers)]
        assert all("bias" not in head[f"fc{i}"] for i in range(projector_layers))  # bias-free linears
        last = f"bn{projector_layers - 1}"
        assert last not in head and last in v["batch_stats"]["head"]  # last BN: statistics, no scale/bias
        assert ("bn1" in v["batch_stats"]["predictor"]) == predictor_bn


def test_bfloat16_vit_runs_with_float32_params():
    config = _config(dtype="bfloat16")
    encoder = methods.build_encoder(config)
    v = encoder.init(jax.random.key(0), jnp.zeros((2, SIZE, SIZE, 3)), train=False, method="query")
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    features, z = encoder.apply(v, jnp.ones((2, SIZE, SIZE, 3)), train=False)
    assert features.dtype == z.dtype == jnp.float32 and np.isfinite(np.asarray(features)).all()


def test_timm_export_round_trip_and_layout(tmp_path):
    config = _config()
    variables = _variables(config)
    path = str(tmp_path / "vit.safetensors")
    formats.write_torchvision(path, config, variables)
    state = load_file(path)
    width, p = 32, 4
    assert state["patch_embed.proj.weight"].shape == (width, 3, p, p)  # OIHW
    assert state["blocks.1.attn.qkv.weight"].shape == (3 * width, width)  # (out, in)
    assert state["pos_embed"].shape == (1, 1 + (SIZE // p) ** 2, width)
    assert {"cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight", "blocks.0.mlp.fc2.bias"} <= set(state)
    assert not any(k.startswith(("head", "predictor")) for k in state)
    with safe_open(path, framework="np") as f:
        metadata = f.metadata()
    kwargs = json.loads(metadata["timm_kwargs"])
    assert kwargs["num_heads"] == 2 and kwargs["patch_size"] == p and kwargs["img_size"] == SIZE
    assert metadata["architecture"] == "vit_test-patch4-16"

    config_back, read = formats.read_torchvision(path)
    assert config_back.model.arch == "vit" and read["batch_stats"] == {}
    jax.tree.map(np.testing.assert_array_equal, read["params"]["backbone"],
                 jax.tree.map(np.asarray, variables["params"]["backbone"]))

    # The JAX features of the re-read encoder are the original's.
    images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pretrained.load(path).embed(images),
                                  embed.Encoder(config, jax.tree.map(np.asarray, variables)).embed(images))


def test_timm_names_for_the_paper_models():
    for size, name in (("small", "vit_small_patch16_224"), ("base", "vit_base_patch16_224")):
        config = _config(vit=size, patch_size=16)
        config.crop_size = 224
        assert formats.architecture_name(config) == name
        shapes = jax.eval_shape(lambda c=config: methods.build_encoder(c).init(
            jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))["params"]["backbone"]
        state = torch_format.vit_to_timm(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes), 14)
        width = {"small": 384, "base": 768}[size]
        # timm's parameter count of vit_{small,base}_patch16_224 without the classifier: 21.67M / 85.80M.
        assert state["pos_embed"].shape == (1, 197, width)
        count = sum(v.size for v in state.values())
        assert count == {"small": 21_665_664, "base": 85_798_656}[size]


def _torch_vit(torch, width, depth, heads, patch, num_tokens):
    """timm's VisionTransformer(num_classes=0, global_pool='token'), written
    out with its module names: pre-norm blocks, fused qkv, exact GELU, eps 1e-6."""
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
            return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention()
            self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, width, patch, patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(width, eps=1e-6)

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.norm(self.blocks(x))[:, 0]

    return VisionTransformer()


def test_pytorch_vit_reproduces_the_features(tmp_path, size="test"):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0, the CPU build)")
    config = _config(vit=size)
    variables = _variables(config)
    path = str(tmp_path / "vit.safetensors")
    formats.write_torchvision(path, config, variables)
    with safe_open(path, framework="np") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    model = _torch_vit(torch, kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["patch_size"],
                       1 + (SIZE // kwargs["patch_size"]) ** 2)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(path).items()}, strict=True)
    model.eval()

    encoder = pretrained.load(path)
    images = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    x = (images / 255.0 - np.asarray(encoder.mean)) / np.asarray(encoder.std)
    with torch.no_grad():
        torch_features = model(torch.from_numpy(x.transpose(0, 3, 1, 2)).float()).numpy()
    jax_features = encoder.embed(images)
    assert jax_features.shape == (8, kwargs["embed_dim"])
    np.testing.assert_allclose(torch_features, jax_features, atol=1e-4, rtol=1e-4)
