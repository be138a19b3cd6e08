"""moco_jax.torch_resnet: PyTorch ResNets that load every moco_jax ResNet
export with strict keys and compute the JAX backbone's features.

Skipped where PyTorch is not installed.
"""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moco_jax import pretrained
from moco_jax.core import models
from moco_jax.io import formats
from test_pretrained import random_variables
from tiny import tiny_config

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0): "
                                            "skipping the PyTorch ResNet tests")
from moco_jax import torch_resnet  # noqa: E402 - needs torch

PACKAGE = Path(__file__).resolve().parents[1] / "moco_jax"


def export(tmp_path, config, seed=0):
    """Random variables for `config`, written as a torchvision export -> (path, JAX encoder)."""
    variables = random_variables(config, seed=seed)
    path = str(tmp_path / "encoder.safetensors")
    formats.write_torchvision(path, config, variables)
    return path, pretrained.Encoder(config, variables)


def torch_features(model, info, images):
    with torch.no_grad():
        return model(info.preprocess(images)).numpy()


def assert_close(got, expected, tol=1e-4):
    """Within `tol`, relative to the features' size where that is above 1 (the
    random weights of a deep net give features in the hundreds)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    error = np.abs(got - expected).max() / max(1.0, np.abs(expected).max())
    assert error < tol, (error, np.abs(expected).max())


def test_default_runs_export_loads_and_computes_the_jax_features(tmp_path):
    config = importlib.import_module("configs.default").get_config()
    path, encoder = export(tmp_path, config)
    model, info = torch_resnet.load(path)
    assert not model.training and isinstance(model.fc, torch.nn.Identity)
    assert (info.architecture, info.depth, info.width, info.stem) == ("resnet10-width16-cifar_stem", 10, 16, "cifar")
    assert info.input_size == config.crop_size == 16
    assert (info.mean, info.std) == (encoder.mean, encoder.std)
    assert info.config["model"]["depth"] == 10
    rng = np.random.default_rng(0)
    # The crop size (no resize), the digits' 8x8 (upsampled) and a larger side (antialiased shrink).
    for side in (16, 8, 24):
        images = rng.integers(0, 256, (5, side, side, 3), dtype=np.uint8)
        assert_close(torch_features(model, info, images), encoder.embed(images))
        assert_close(torch_features(model, info, torch.from_numpy(images)), encoder.embed(images))


@pytest.mark.parametrize("depth,width,stem", [(18, 8, "imagenet"), (50, 4, "imagenet"), (18, 4, "cifar"),
                                              (34, 2, "cifar")])
def test_other_shapes_load_and_compute_the_jax_features(tmp_path, depth, width, stem):
    config = tiny_config(augmentation="moco_v2", crop_size=32, image_size=32)
    config.model.depth, config.model.width, config.model.stem = depth, width, stem
    path, encoder = export(tmp_path, config, seed=depth)
    model, info = torch_resnet.load(path)
    assert (info.depth, info.width, info.stem) == (depth, width, stem)
    assert model.feature_dim == encoder.feature_dim
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert_close(torch_features(model, info, images), encoder.embed(images))


def test_block_table_equals_the_jax_models():
    assert set(torch_resnet.ARCHITECTURES) == set(models.ARCHITECTURES)
    for depth, (stages, block) in models.ARCHITECTURES.items():
        assert torch_resnet.ARCHITECTURES[depth] == (tuple(stages), block is models.Bottleneck), depth
    assert torch_resnet.STEMS == models.STEMS


def test_resnet50_is_torchvisions():
    """torchvision's resnet50: 320 state-dict entries and 25,557,032 parameters (fc included)."""
    model = torch_resnet.ResNet(50, num_classes=1000)
    assert len(model.state_dict()) == 320
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    assert torch_resnet.ResNet(50).feature_dim == 2048


def test_architecture_name_is_parsed_without_a_config(tmp_path):
    """A file whose metadata lacks the config is built from its architecture name."""
    from safetensors.numpy import load_file, save_file

    config = tiny_config()
    config.model.width, config.model.stem = 4, "cifar"
    path, encoder = export(tmp_path, config)
    metadata = formats.torchvision_metadata(config)
    del metadata["moco_jax_config"]
    bare = str(tmp_path / "bare.safetensors")
    save_file(load_file(path), bare, metadata=metadata)
    model, info = torch_resnet.load(bare)
    assert (info.depth, info.width, info.stem, info.config) == (config.model.depth, 4, "cifar", {})


def test_a_vit_export_is_refused_with_a_pointer_to_timm(tmp_path):
    config = tiny_config()
    config.model.arch, config.model.vit, config.model.patch_size = "vit", "test", 4
    path = str(tmp_path / "vit.safetensors")
    formats.write_torchvision(path, config, random_variables(config))
    with pytest.raises(ValueError, match="ViT export .* load it with timm"):
        torch_resnet.load(path)


def test_files_that_are_not_exports_are_refused(tmp_path):
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a moco_jax ResNet export .*not a safetensors file"):
        torch_resnet.load(str(junk))
    bare = str(tmp_path / "bare.safetensors")
    save_file({"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, bare)
    with pytest.raises(ValueError, match="no moco_jax metadata"):
        torch_resnet.load(bare)
    save_file({"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, bare,
              metadata={"architecture": "efficientnet_b0", "mean": json.dumps([0.5] * 3)})
    with pytest.raises(ValueError, match="not a moco_jax ResNet export"):
        torch_resnet.load(bare)


def test_no_module_of_the_package_imports_it():
    """torch stays optional: only users import moco_jax.torch_resnet."""
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else [])
            if any(n.endswith("torch_resnet") for n in names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert importers == []


def test_it_imports_neither_jax_nor_the_rest_of_the_package():
    code = ("import sys, moco_jax.torch_resnet; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'torchvision') "
            "or m.startswith('moco_jax.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['moco_jax.torch_resnet']"
