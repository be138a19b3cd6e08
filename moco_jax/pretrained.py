"""Pretrained MoCo encoders for downstream JAX code.

    from moco_jax import pretrained
    encoder = pretrained.load("encoder.msgpack")      # or a workdir, .safetensors, .pth.tar
    features = encoder.embed(images_uint8)           # (B, H, W, 3) uint8 -> (B, D) float32

`embed` applies the preprocessing the encoder was trained with (scale to
[0, 1], resize to the config's `crop_size` if needed, normalise with the
mean/std of the config's augmentation recipe) and runs the backbone with BN
in inference mode, exactly as the in-training kNN monitor does
(`trainer.make_embed_fn`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from moco_jax import augment, export, knn, models, torch_format, trainer

TORCH_SUFFIXES = (".pth", ".pt", ".tar")


def imported_config(architecture: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config fields an encoder needs (model, embedding, preprocessing),
    for weights trained elsewhere. ImageNet stem: 224 px inputs normalised
    with ImageNet mean/std (the MoCo v2 recipe); CIFAR stem: 32 px with the
    CIFAR demo's mean/std."""
    imagenet = architecture["stem"] == "imagenet"
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        depth=architecture["depth"], width=architecture["width"], stem=architecture["stem"],
        head=architecture.get("head") or "none", dtype="float32", sync_bn=False, bn_momentum=0.9,
    ))
    config.embed_dim = architecture.get("embed_dim") or 0
    config.bn_splits = 1
    config.augmentation = "moco_v2" if imagenet else "cifar"
    config.crop_size = config.image_size = 224 if imagenet else 32
    config.crop_scale = (0.2, 1.0) if imagenet else (0.08, 1.0)
    return config


def from_torch_state_dict(state_dict: Mapping[str, Any], prefix: str | None = None):
    """An official MoCo `state_dict` (`module.encoder_q.*`, v1 or v2 head) or a
    torchvision one, as numpy arrays -> (config, variables). No PyTorch needed."""
    variables, architecture = torch_format.moco_state_dict_to_encoder(state_dict, prefix)
    return imported_config(architecture), variables


def read_torch_checkpoint(path: str, prefix: str | None = None):
    """An official MoCo checkpoint file (`{"state_dict": ...}`) or a saved
    state dict -> (config, variables). Needs PyTorch (imported here only)."""
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch: pip install torch (the CPU build is enough)") from e
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)
    state_dict = {k: v.detach().cpu().numpy() for k, v in state_dict.items() if hasattr(v, "numpy")}
    return from_torch_state_dict(state_dict, prefix)


def load_variables(source) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, variables) from a pretraining workdir (newest checkpoint), a
    flax export (`.msgpack`), a torchvision export (`.safetensors`), an
    official MoCo checkpoint (`.pth.tar`, `.pth`, `.pt`) or an in-memory
    torch-style state dict of numpy arrays."""
    if isinstance(source, Mapping):
        return from_torch_state_dict(source)
    source = os.fspath(source)
    if os.path.isdir(source):
        from moco_jax import checkpoint  # noqa: PLC0415 - orbax is heavy; only workdirs need it

        return checkpoint.load_encoder_variables(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"no pretrained encoder at {source}")
    if source.endswith(".msgpack"):
        return export.read_flax(source)
    if source.endswith(".safetensors"):
        return export.read_torchvision(source)
    if source.endswith(TORCH_SUFFIXES):
        return read_torch_checkpoint(source)
    raise ValueError(f"don't know how to read {source}: expected a workdir, .msgpack, .safetensors or "
                     f"one of {TORCH_SUFFIXES}")


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """A pretrained query encoder: its config and variables
    ({"params": {"backbone", ["head"]}, "batch_stats": {"backbone"}})."""

    config: ml_collections.ConfigDict
    variables: dict[str, Any]

    @property
    def has_head(self) -> bool:
        return "head" in self.variables["params"]

    @property
    def mean(self) -> tuple[float, ...]:
        return export.normalization(self.config)[0]

    @property
    def std(self) -> tuple[float, ...]:
        return export.normalization(self.config)[1]

    @property
    def backbone(self) -> models.ResNet:
        return models.build_encoder(self.config).backbone

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @functools.cached_property
    def backbone_variables(self) -> dict[str, Any]:
        return jax.device_put(export.backbone_variables(self.variables))

    @functools.cached_property
    def _embed(self):
        backbone, crop, mean, std = self.backbone, self.config.crop_size, self.mean, self.std
        return jax.jit(lambda v, x: backbone.apply(v, augment.eval_view(x, crop, mean, std), train=False))

    @functools.cached_property
    def _project(self):
        if not self.has_head:
            raise ValueError("this encoder has no projection head (e.g. it was loaded from a torchvision file)")
        return trainer.make_embed_fn(models.build_encoder(self.config), self.config)

    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, feature_dim) backbone features."""
        fn = functools.partial(self._embed, self.backbone_variables)
        return knn.extract_features(fn, np.asarray(images), min(batch_size, len(images)))

    def project(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, embed_dim) unit-norm projections
        (the head's output, as MoCo's contrastive loss sees it)."""
        fn = lambda x: self._project(self.variables, x)[1]  # noqa: E731
        return knn.extract_features(fn, np.asarray(images), min(batch_size, len(images)))


def load(source) -> Encoder:
    """An `Encoder` from anything `load_variables` reads."""
    config, variables = load_variables(source)
    return Encoder(config, jax.tree.map(np.asarray, variables))

