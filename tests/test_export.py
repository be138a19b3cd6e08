"""Export formats: flax, torchvision safetensors, detectron2; and PyTorch parity.

The PyTorch tests use a small ResNet written here with torchvision's module
names (torchvision itself does not install beside the CPU PyTorch of this
environment); they skip when PyTorch is not installed.
"""

import json
import os
import pickle
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from moco_jax import pretrained
from moco_jax.core import augment, image_ops, models
from moco_jax.io import formats, torch_format
from moco_jax import methods
from test_pretrained import assert_trees_equal, random_variables, tiny_pretraining
from tiny import tiny_config


def imagenet_config(depth=18, width=4, head="mlp", stem="imagenet"):
    config = tiny_config(augmentation="moco_v2", crop_size=32, image_size=32)
    config.model.depth, config.model.width, config.model.head, config.model.stem = depth, width, head, stem
    return config


def test_torchvision_round_trip_is_exact(tmp_path):
    config = imagenet_config()
    variables = random_variables(config)
    path = str(tmp_path / "r18.safetensors")
    formats.write_torchvision(path, config, variables)

    state_dict = load_file(path)
    assert "layer2.0.downsample.0.weight" in state_dict and "layer2.0.downsample.1.running_var" in state_dict
    assert state_dict["conv1.weight"].shape == (4, 3, 7, 7)  # OIHW
    assert state_dict["bn1.num_batches_tracked"].dtype == np.int64
    assert not any(k.startswith("fc") for k in state_dict)
    np.testing.assert_array_equal(state_dict["layer1.0.bn2.running_var"],
                                  variables["batch_stats"]["backbone"]["layer1_0"]["bn2"]["var"])
    with safe_open(path, framework="np") as f:
        metadata = f.metadata()
    assert metadata["architecture"] == "resnet18-width4"
    assert json.loads(metadata["mean"]) == list(image_ops.IMAGENET_MEAN)
    assert json.loads(metadata["std"]) == list(image_ops.IMAGENET_STD)
    assert metadata["input_size"] == "32"

    read_config, read = formats.read_torchvision(path)
    assert read_config.to_dict() == json.loads(config.to_json())
    assert_trees_equal(read, {"params": {"backbone": variables["params"]["backbone"]},
                              "batch_stats": variables["batch_stats"]})


@pytest.mark.parametrize("include_head", [True, False])
def test_flax_round_trip_is_exact(tmp_path, include_head):
    config = tiny_config()
    variables = random_variables(config)
    path = str(tmp_path / "encoder.msgpack")
    formats.write_flax(path, config, variables, include_head=include_head)
    read_config, read = formats.read_flax(path)
    assert read_config.to_dict() == json.loads(config.to_json())
    expected = variables if include_head else {"params": {"backbone": variables["params"]["backbone"]},
                                               "batch_stats": variables["batch_stats"]}
    assert_trees_equal(read, expected)


def test_detectron2_pickle_has_the_official_scripts_names(tmp_path):
    config = imagenet_config(depth=50, width=2)
    variables = random_variables(config)
    path = str(tmp_path / "r50.pkl")
    formats.write_detectron2(path, config, variables)
    with open(path, "rb") as f:
        checkpoint = pickle.load(f)
    assert checkpoint["__author__"] == "MOCO" and checkpoint["matching_heuristics"] is True
    model = checkpoint["model"]
    torchvision = torch_format.backbone_to_torchvision(models.backbone_variables(variables))
    assert len(model) == len(torchvision)
    # Renamings of convert-pretrain-to-detectron2.py, one per rule.
    expected = {
        "stem.conv1.weight": "conv1.weight",
        "stem.conv1.norm.running_var": "bn1.running_var",
        "res2.0.conv1.weight": "layer1.0.conv1.weight",
        "res2.0.conv3.norm.weight": "layer1.0.bn3.weight",
        "res2.0.shortcut.weight": "layer1.0.downsample.0.weight",
        "res2.0.shortcut.norm.running_mean": "layer1.0.downsample.1.running_mean",
        "res5.2.conv2.norm.bias": "layer4.2.bn2.bias",
    }
    for d2_name, tv_name in expected.items():
        np.testing.assert_array_equal(model[d2_name], torchvision[tv_name])
    assert not any("layer" in k or "downsample" in k or ".bn" in k for k in model)
    with pytest.raises(ValueError, match="stem"):
        formats.write_detectron2(path, tiny_config(), random_variables(tiny_config()))


@pytest.mark.slow
def test_export_from_a_workdir(tmp_path):
    _, workdir, result = tiny_pretraining()
    state = result["state"]
    for fmt, given, expected in (("flax", "encoder.msgpack", "encoder.msgpack"),
                                 ("torchvision", "encoder", "encoder.safetensors")):  # the ending is added
        path = formats.export(workdir, fmt, str(tmp_path / given))
        assert path == str(tmp_path / expected)
        _, read = pretrained.load_variables(path)
        np.testing.assert_array_equal(read["params"]["backbone"]["conv1"]["kernel"],
                                      state.params["backbone"]["conv1"]["kernel"])
        np.testing.assert_array_equal(read["batch_stats"]["backbone"]["layer4_0"]["bn2"]["var"],
                                      state.batch_stats["backbone"]["layer4_0"]["bn2"]["var"])


# ---------------------------------------------------------------------------
# PyTorch parity.
# ---------------------------------------------------------------------------
def _torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0): "
                                               "skipping the PyTorch parity tests")


def torch_resnet(torch, depth, width, stem, num_classes=1000):
    """A ResNet with torchvision's module names and structure (v1.5 bottleneck)."""
    nn = torch.nn
    stages, block = models.ARCHITECTURES[depth]
    bottleneck = block is models.Bottleneck
    expansion = 4 if bottleneck else 1

    class Block(nn.Module):
        def __init__(self, cin, filters, stride):
            super().__init__()
            cout = filters * expansion
            if bottleneck:
                self.conv1 = nn.Conv2d(cin, filters, 1, bias=False)
                self.conv2 = nn.Conv2d(filters, filters, 3, stride, 1, bias=False)
                self.conv3 = nn.Conv2d(filters, cout, 1, bias=False)
                self.bn3 = nn.BatchNorm2d(cout)
            else:
                self.conv1 = nn.Conv2d(cin, filters, 3, stride, 1, bias=False)
                self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
            self.bn1, self.bn2 = nn.BatchNorm2d(filters), nn.BatchNorm2d(cout if not bottleneck else filters)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            if bottleneck:
                y = self.bn3(self.conv3(torch.relu(y)))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            if stem == "imagenet":
                self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
                self.maxpool = nn.MaxPool2d(3, 2, 1)
            else:
                self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
                self.maxpool = nn.Identity()
            self.bn1 = nn.BatchNorm2d(width)
            cin = width
            for i, n in enumerate(stages):
                blocks = []
                for j in range(n):
                    blocks.append(Block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
                    cin = width * 2**i * expansion
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(cin, num_classes)

        def features(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
            return x.mean(dim=(2, 3))

    return ResNet()


def jax_features(config, variables, images):
    mean, std = augment.normalization(config)
    x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    backbone = methods.build_encoder(config).backbone
    apply = jax.jit(lambda v, x: backbone.apply(v, x, train=False))
    return np.asarray(apply(models.backbone_variables(variables), x)), x


@pytest.mark.parametrize("depth,stem", [(18, "imagenet"), (10, "cifar")])
def test_pytorch_resnet_loads_the_export_and_computes_the_same_features(tmp_path, depth, stem):
    torch = _torch()
    from safetensors.torch import load_file as torch_load_file

    config = imagenet_config(depth=depth, stem=stem)
    variables = random_variables(config, seed=depth)
    path = str(tmp_path / "encoder.safetensors")
    formats.write_torchvision(path, config, variables)

    model = torch_resnet(torch, depth, width=4, stem=stem).eval()
    result = model.load_state_dict(torch_load_file(path), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch_load_file(path), strict=True)

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    expected, x = jax_features(config, variables, images)
    with torch.no_grad():
        got = model.features(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    assert got.shape == expected.shape == (6, 32)
    assert np.abs(got - expected).max() < 1e-4, np.abs(got - expected).max()


def test_resnet50_export_has_torchvisions_names_and_shapes():
    torch = _torch()
    config = imagenet_config(depth=50, width=64)
    shapes = jax.eval_shape(lambda: methods.build_encoder(config).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    exported = torch_format.backbone_to_torchvision(models.backbone_variables(zeros))

    reference = {k: tuple(v.shape) for k, v in torch_resnet(torch, 50, 64, "imagenet").state_dict().items()}
    assert {k: v.shape for k, v in exported.items()} == {k: v for k, v in reference.items() if not k.startswith("fc.")}
    # Independent of the test-local model: torchvision's resnet50 has 320
    # state-dict entries and 25,557,032 parameters, fc (2048 x 1000 + 1000) included.
    assert len(exported) == 320 - 2
    learned = [k for k in exported if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert sum(exported[k].size for k in learned) == 25_557_032 - 2_049_000
    assert formats.architecture_name(config) == "resnet50"


def test_official_checkpoint_file_is_imported_with_its_head(tmp_path):
    """A `.pth.tar` as `main_moco.py` saves it (MoCo v2 MLP head) -> JAX
    features and projections equal to the PyTorch model's."""
    torch = _torch()
    depth, width, embed_dim = 18, 4, 16
    model = torch_resnet(torch, depth, width, "imagenet", num_classes=embed_dim)
    model.fc = torch.nn.Sequential(torch.nn.Linear(8 * width, 8 * width), torch.nn.ReLU(),
                                   torch.nn.Linear(8 * width, embed_dim))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1, generator=generator)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5, generator=generator)
    model.eval()
    state_dict = {f"module.encoder_q.{k}": v for k, v in model.state_dict().items()}
    state_dict.update({f"module.encoder_k.{k}": v.clone() for k, v in model.state_dict().items()})
    state_dict["module.queue"] = torch.randn(embed_dim, 64)
    path = str(tmp_path / "checkpoint_0199.pth.tar")
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state_dict, "optimizer": {}}, path)

    encoder = pretrained.load(path)
    assert encoder.has_head and encoder.config.model.head == "mlp" and encoder.config.embed_dim == embed_dim
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    config = encoder.config.copy_and_resolve_references()
    config.crop_size = 32  # embed at the test images' size (no resize)
    encoder = pretrained.Encoder(config, encoder.variables)
    x = (images / 255.0 - np.asarray(encoder.mean)) / np.asarray(encoder.std)
    with torch.no_grad():
        features = model.features(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32)))
        z = torch.nn.functional.normalize(model.fc(features), dim=1).numpy()
    assert np.abs(encoder.embed(images) - features.numpy()).max() < 1e-4
    assert np.abs(encoder.project(images) - z).max() < 1e-4


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_format_is_written_with_the_mode_of_a_plain_open(tmp_path, umask):
    """0644 under umask 022 (colleagues can read the export): the mode a plain
    open() gives, for every format (safetensors' own save_file gives 0600)."""
    config = imagenet_config()  # the ImageNet stem: detectron2 takes it
    source = str(tmp_path / "source.msgpack")
    formats.write_flax(source, config, random_variables(config))
    previous = os.umask(umask)
    try:
        for fmt in formats.WRITERS:
            path = formats.export(source, fmt, str(tmp_path / f"out_{fmt}"))
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, (fmt, oct(os.stat(path).st_mode))
        formats.export(source, "torchvision", str(tmp_path / "out_torchvision"))  # replacing a file
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "out_torchvision.safetensors").st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["out_detectron2.pkl", "out_flax.msgpack", "out_torchvision.safetensors",
                                            "source.msgpack"]  # no temporary file left
