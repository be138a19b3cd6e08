"""What a pretrained encoder computes, in one place for everyone who asks:
the trainer's kNN monitor, `moco_jax.pretrained`, export and the evaluation
programs.

The evaluation view of an image (`image_ops.eval_view`): uint8 -> [0, 1],
bilinear resize to the pretraining `crop_size` where it differs, normalised
with the pretraining recipe's mean/std; then the encoder with BN in
inference mode (running statistics).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moco_jax import methods
from moco_jax.core import augment, image_ops, models, vit
from moco_jax.core.errors import ConfigError
from moco_jax.methods.contrastive import l2_normalize
from moco_jax.data import ArrayDataset
from moco_jax.eval import knn
from moco_jax.io import formats

FEATURES = ("backbone", "projection")


def make_embed_fn(config) -> Callable:
    """(encoder variables, uint8 images (B, H, W, 3)) -> (backbone features
    (B, D), unit projections (B, embed_dim)), jitted."""
    encoder, (mean, std) = methods.build_encoder(config), augment.normalization(config)

    @jax.jit
    def embed(variables, images):
        features, z = encoder.apply(variables, image_ops.eval_view(images, config.crop_size, mean, std), train=False)
        return features, l2_normalize(z)

    return embed


def make_backbone_fn(config) -> Callable:
    """(backbone variables, uint8 images (B, H, W, 3)) -> features (B, D), jitted."""
    backbone, (mean, std) = methods.build_encoder(config).backbone, augment.normalization(config)
    return jax.jit(lambda v, x: backbone.apply(v, image_ops.eval_view(x, config.crop_size, mean, std), train=False))


def knn_accuracies(embed_fn: Callable, variables: Any, dataset: ArrayDataset, *, k: int, temperature: float,
                   batch_size: int, features: Sequence[str] = FEATURES) -> dict[str, float]:
    """Weighted kNN top-1 in [0, 1] on the test split, bank = the train split,
    for each kind of feature `embed_fn` returns (named by `features`, in its
    order: published numbers use the backbone or the projection; the CIFAR
    demo uses the projection). One pass over the images for all kinds.

    Args:
      embed_fn: (variables, uint8 (B, H, W, 3)) -> a tuple of (B, D_i) arrays.
    """
    widths = [s.shape[-1] for s in jax.eval_shape(embed_fn, variables, dataset.test_images[:1])]
    banks, queries = (_features(embed_fn, variables, images, batch_size)
                      for images in (dataset.train_images, dataset.test_images))
    ends = np.cumsum(widths)
    result = {}
    for name, end, width in zip(features, ends, widths):
        cols = slice(end - width, end)
        result[name] = knn.knn_accuracy(queries[:, cols], dataset.test_labels, banks[:, cols],
                                        dataset.train_labels, dataset.num_classes, k=k, temperature=temperature)
    return result


@functools.lru_cache(maxsize=8)
def _concatenated(embed_fn: Callable) -> Callable:
    """(variables, images) -> every kind of feature of `embed_fn`, side by side (one pass)."""
    return lambda variables, images: jnp.concatenate(embed_fn(variables, images), axis=1)


def _features(embed_fn: Callable, variables: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, sum of D_i) features of `images`: on all of this process's devices
    in a single-process job, on one device in each process of several."""
    if jax.process_count() > 1:
        return knn.extract_features(functools.partial(_concatenated(embed_fn), variables), images, batch_size)
    return knn.extract_features_on_devices(_concatenated(embed_fn), variables, images, batch_size)


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """A pretrained query encoder: its config and variables
    ({"params": {"backbone", ["head"], ["predictor"]}, "batch_stats": ...}):
    a ResNet or (MoCo v3) a ViT, whose features are its [CLS] token.

    `embed` gives backbone features, `project` the unit-norm head outputs,
    both with the evaluation view; `knn_accuracies` scores them.
    """

    config: ml_collections.ConfigDict
    variables: dict[str, Any]

    @property
    def has_head(self) -> bool:
        return "head" in self.variables["params"]

    @property
    def mean(self) -> tuple[float, ...]:
        return augment.normalization(self.config)[0]

    @property
    def std(self) -> tuple[float, ...]:
        return augment.normalization(self.config)[1]

    @property
    def backbone(self) -> models.ResNet | vit.VisionTransformer:
        return methods.build_encoder(self.config).backbone

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @functools.cached_property
    def backbone_variables(self) -> dict[str, Any]:
        return jax.device_put(models.backbone_variables(self.variables))

    @functools.cached_property
    def _embed(self) -> Callable:
        return make_backbone_fn(self.config)

    @functools.cached_property
    def _project(self) -> Callable:
        if not self.has_head:
            raise ConfigError("this encoder has no projection head (e.g. it was loaded from a torchvision file)")
        return make_embed_fn(self.config)

    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, feature_dim) backbone features."""
        fn = functools.partial(self._embed, self.backbone_variables)
        return knn.extract_features(fn, np.asarray(images), min(batch_size, len(images)))

    def project(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, embed_dim) unit-norm projections
        (the head's output, as MoCo's contrastive loss sees it)."""
        fn = lambda x: self._project(self.variables, x)[1]  # noqa: E731
        return knn.extract_features(fn, np.asarray(images), min(batch_size, len(images)))

    def knn_accuracies(self, dataset: ArrayDataset, k: int = 200, temperature: float = 0.1, batch_size: int = 256,
                       features: Sequence[str] = FEATURES) -> dict[str, float]:
        """Weighted kNN top-1 per kind of feature ('backbone', 'projection'),
        with exactly the code of the in-training monitor."""
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ConfigError(f"features must be among {FEATURES}, got {sorted(unknown)}")
        if self.has_head:
            result = knn_accuracies(self._project, self.variables, dataset, k=k, temperature=temperature,
                                    batch_size=batch_size)
            return {name: result[name] for name in features}
        if "projection" in features:
            raise ConfigError("this encoder has no projection head; use features=('backbone',)")
        embed = lambda v, x: (self._embed(v, x),)  # noqa: E731
        return knn_accuracies(embed, self.backbone_variables, dataset, k=k, temperature=temperature,
                              batch_size=batch_size, features=("backbone",))


def load(source) -> Encoder:
    """An `Encoder` from anything `formats.load_variables` reads: a
    pretraining workdir (its newest checkpoint), a flax export (.msgpack), a
    torchvision export (.safetensors), an official MoCo checkpoint (.pth.tar)
    or a torch-style state dict of numpy arrays."""
    config, variables = formats.load_variables(source)
    return Encoder(config, jax.tree.map(np.asarray, variables))
