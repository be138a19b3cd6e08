"""PyTorch ResNets that load any moco_jax ResNet export (needs torch + safetensors only).

    from moco_jax import torch_resnet
    model, info = torch_resnet.load("encoder.safetensors")   # eval mode, strict keys
    with torch.no_grad():
        features = model(info.preprocess(images_uint8))       # (N, H, W, 3) uint8 -> (N, D)
    # == moco_jax.pretrained.load("encoder.safetensors").embed(images_uint8), to float rounding
    model.fc = torch.nn.Linear(model.feature_dim, 10)         # a classifier, to fine-tune

`python -m moco_jax.export --format torchvision` writes torchvision's names
and layouts, but only the standard shapes (depth 18/34/50, width 64, ImageNet
stem) fit a torchvision constructor; `ResNet` here builds every shape moco_jax trains
(depth 10/18/34/50, any width, `imagenet` or `cifar` stem) with torchvision's
module names, so the export loads with `strict=True`. It imports nothing
else of moco_jax (no JAX), and nothing in moco_jax imports it: PyTorch stays
an optional dependency.

BatchNorm: the stored running variance is moco_jax's (biased) one and is used
as is in eval mode, so features equal the JAX model's; train mode updates it
PyTorch's way from there.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# depth -> (blocks per stage, bottleneck blocks?). The same table as
# moco_jax.core.models.ARCHITECTURES (a test keeps them equal); ResNet-10 is
# moco_jax's small variant, the others are torchvision's.
ARCHITECTURES: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    10: ((1, 1, 1, 1), False),
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
}
STEMS = ("imagenet", "cifar")


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free convolution padded symmetrically by kernel // 2 (torchvision's)."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The shortcut `downsample.0` (1x1 strided conv) / `.1` (BN), or None when
    the block keeps its input's shape."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-10/18/34): (N, cin, H, W) -> (N, filters, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, cin: int, filters: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, filters, 3, stride), nn.BatchNorm2d(filters)
        self.conv2, self.bn2 = _conv(filters, filters, 3), nn.BatchNorm2d(filters)
        self.downsample = _downsample(cin, filters, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided: torchvision's "v1.5") -> 1x1 x4 (ResNet-50):
    (N, cin, H, W) -> (N, 4 * filters, H/stride, W/stride)."""

    expansion = 4

    def __init__(self, cin: int, filters: int, stride: int):
        super().__init__()
        cout = filters * self.expansion
        self.conv1, self.bn1 = _conv(cin, filters, 1), nn.BatchNorm2d(filters)
        self.conv2, self.bn2 = _conv(filters, filters, 3, stride), nn.BatchNorm2d(filters)
        self.conv3, self.bn3 = _conv(filters, cout, 1), nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _stage(block: type, cin: int, filters: int, num_blocks: int, stride: int) -> nn.Sequential:
    """`num_blocks` blocks, the first with `stride`: torchvision's `layerN`."""
    blocks = [block(cin, filters, stride)]
    blocks += [block(filters * block.expansion, filters, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """A ResNet with torchvision's module names: images (N, 3, H, W), normalised
    -> pooled features (N, feature_dim) when `num_classes=0` (`fc` is then
    `nn.Identity()`, as moco_jax's backbone), else logits (N, num_classes).

    Args:
      depth: 10, 18, 34 (basic blocks) or 50 (bottlenecks); see ARCHITECTURES.
      width: channels of the first stage (64 in torchvision); stages double it.
        feature_dim = 8 * width (x4 for depth 50).
      stem: "imagenet": 7x7/2 `conv1` + 3x3/2 max-pool; "cifar": 3x3/1 `conv1`
        and no max-pool (the MoCo CIFAR demo).
      num_classes: 0 for features, else the outputs of a linear `fc`.
    """

    def __init__(self, depth: int, width: int = 64, stem: str = "imagenet", num_classes: int = 0):
        super().__init__()
        if depth not in ARCHITECTURES:
            raise ValueError(f"depth={depth!r} must be one of {', '.join(map(str, ARCHITECTURES))}")
        if stem not in STEMS:
            raise ValueError(f"stem={stem!r} must be one of {', '.join(map(repr, STEMS))}")
        stages, bottleneck = ARCHITECTURES[depth]
        block = Bottleneck if bottleneck else BasicBlock
        self.depth, self.width, self.stem = depth, width, stem
        self.conv1 = _conv(3, width, 7, 2) if stem == "imagenet" else _conv(3, width, 3, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        cin = width
        for i, num_blocks in enumerate(stages):
            stage = _stage(block, cin, width * 2**i, num_blocks, 1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
            cin = width * 2**i * block.expansion
        self.feature_dim = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes) if num_classes else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> pooled features (N, feature_dim)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, feature_dim) features, or (N, num_classes) logits."""
        return self.fc(self.features(x))


# ---------------------------------------------------------------------------
# Exports.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What a moco_jax export says about its model and its input.

    architecture: e.g. "resnet50", "resnet10-width16-cifar_stem"; depth,
    width, stem: the `ResNet` arguments; input_size: the side S of the
    (square) images it was trained on; mean, std: RGB normalisation of images
    in [0, 1]; config: the moco_jax config it was trained with (a dict, {} if
    the file has none).
    """

    architecture: str
    depth: int
    width: int
    stem: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    config: dict[str, Any]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """RGB floats in [0, 1], (N, 3, H, W) (e.g. torchvision's ToTensor,
        stacked) -> (x - mean) / std, same shape."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def preprocess(self, images: Any, device: str | torch.device | None = None) -> torch.Tensor:
        """moco_jax's evaluation view, as `pretrained.load(...).embed` applies it:
        uint8 (N, H, W, 3) RGB (numpy or torch) -> float32 (N, 3, S, S) with
        S = input_size: scaled to [0, 1], bilinearly resized to S where it
        differs (antialiased when shrinking, as jax.image.resize), normalised."""
        x = torch.as_tensor(images, device=device).permute(0, 3, 1, 2).float() / 255.0
        if tuple(x.shape[2:]) != (self.input_size, self.input_size):
            shrink = x.shape[2] > self.input_size or x.shape[3] > self.input_size
            x = F.interpolate(x, (self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=shrink)
        return self.normalize(x)


def _not_a_resnet(path: str, reason: str) -> ValueError:
    return ValueError(f"{path} is not a moco_jax ResNet export ({reason}); expected a .safetensors file written by "
                      "`python -m moco_jax.export --format torchvision` from a ResNet run")


def _vit_error(path: str) -> ValueError:
    return ValueError(f"{path} is a ViT export (timm layout), not a ResNet: load it with timm, e.g. "
                      "timm.models.vision_transformer.VisionTransformer(**json.loads(metadata['timm_kwargs']))")


def _parse_architecture(name: str) -> tuple[int, int, str]:
    """'resnet10-width16-cifar_stem' -> (10, 16, 'cifar'); 'resnet50' -> (50, 64,
    'imagenet'). The inverse of moco_jax.io.formats.architecture_name.
    Raises ValueError for any other name."""
    first, *rest = name.split("-")
    if not first.startswith("resnet"):
        raise ValueError(f"architecture {name!r}")
    width, stem = 64, "imagenet"
    for part in rest:
        if part.endswith("_stem"):
            stem = part[:-len("_stem")]
        elif part.startswith("width"):
            width = int(part[len("width"):])
        else:
            raise ValueError(f"architecture {name!r}")
    return int(first[len("resnet"):]), width, stem


def read_info(path: str, metadata: Mapping[str, str]) -> ExportInfo:
    """safetensors metadata (str -> str) of a moco_jax ResNet export -> ExportInfo.
    depth, width and stem come from the stored config's `model`, else from the
    architecture name. Raises ValueError for anything else (a ViT export, a
    file without moco_jax metadata)."""
    try:
        config = json.loads(metadata.get("moco_jax_config", "{}"))
        model = config.get("model") or {}
    except (AttributeError, ValueError):
        raise _not_a_resnet(path, "its moco_jax_config metadata is not a JSON config") from None
    architecture = metadata.get("architecture", "")
    if model.get("arch", "resnet") == "vit" or architecture.startswith("vit"):
        raise _vit_error(path)
    if not architecture:
        raise _not_a_resnet(path, "it has no moco_jax metadata")
    try:
        if "depth" in model:
            depth, width, stem = int(model["depth"]), int(model.get("width", 64)), model.get("stem", "imagenet")
        else:
            depth, width, stem = _parse_architecture(architecture)
        mean, std = tuple(json.loads(metadata["mean"])), tuple(json.loads(metadata["std"]))
        return ExportInfo(architecture, depth, width, stem, int(metadata["input_size"]), mean, std, config)
    except KeyError as e:
        raise _not_a_resnet(path, f"its metadata has no {e}") from None
    except (TypeError, ValueError) as e:
        raise _not_a_resnet(path, f"unreadable metadata: {e}") from None


def load(path: str, device: str | torch.device = "cpu") -> tuple[ResNet, ExportInfo]:
    """A moco_jax torchvision-format export (.safetensors) -> (model, info).

    model: `ResNet(depth, width, stem, num_classes=0)` holding the file's
    weights (loaded with strict keys), in eval mode, on `device`: normalised
    images (N, 3, S, S) -> features (N, feature_dim). info: `ExportInfo`
    (architecture, input_size S, mean, std, config; `info.preprocess` turns
    uint8 (N, H, W, 3) images into the model's input).
    Raises ValueError when the file is not a moco_jax ResNet export.
    """
    from safetensors import safe_open  # noqa: PLC0415 - only loading needs it
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        with safe_open(path, framework="pt") as f:
            metadata, keys = f.metadata() or {}, set(f.keys())
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' errors: not a safetensors file
        raise _not_a_resnet(path, f"not a safetensors file: {type(e).__name__}: {e}") from None
    if "cls_token" in keys:
        raise _vit_error(path)
    info = read_info(path, metadata)
    model = ResNet(info.depth, info.width, info.stem)
    model.load_state_dict(load_file(path), strict=True)
    return model.to(device).eval(), info
