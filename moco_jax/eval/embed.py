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


class KnnAccuracies(dict):
    """{kind of feature: weighted kNN top-1 in [0, 1]} ('backbone',
    'projection'), with what they were measured on: `bank_size`, the images
    in the bank, and `num_queries`, the queries scored (skipped undecodable
    images excluded from both). Accuracies are comparable only over the same
    bank: log `bank_size` with them (the trainer's `knn_bank` scalar)."""

    def __init__(self, accuracies, bank_size: int, num_queries: int):
        super().__init__(accuracies)
        self.bank_size, self.num_queries = bank_size, num_queries


def knn_accuracies(embed_fn: Callable, variables: Any, data: knn.KnnData | ArrayDataset, *, k: int,
                   temperature: float, batch_size: int, features: Sequence[str] = FEATURES) -> KnnAccuracies:
    """Weighted kNN top-1 in [0, 1] of the queries against the bank, for each
    kind of feature `embed_fn` returns (named by `features`, in its order:
    published numbers use the backbone or the projection; the CIFAR demo
    uses the projection). One pass over the images for all kinds, on every
    device of every process (`knn.streamed_counts`: the bank stays sharded
    over the devices, the queries stream); all processes call it together
    and get the same numbers.

    Args:
      embed_fn: (variables, uint8 (B, H, W, 3)) -> a tuple of (B, D_i) arrays;
        a stable function (its compiled steps are kept for the next call).
      variables: the encoder's variables (host arrays).
      data: the bank and queries (`knn.monitor_data`), or in-memory arrays
        (train images the bank, test images the queries).
      batch_size: images per global step (rounded up to a multiple of the devices).
    """
    data = knn.array_data(data) if isinstance(data, ArrayDataset) else data
    counts = knn.streamed_counts(embed_fn, variables, data, k=k, temperature=temperature, batch_size=batch_size)
    accuracy = lambda c: c / counts.queries if counts.queries else float("nan")  # noqa: E731
    return KnnAccuracies({name: accuracy(c) for name, c in zip(features, counts.correct)}, counts.bank,
                         counts.queries)


def streamed_knn_accuracies(embed_fn: Callable, variables: Any, source, *, bank_split: str, query_split: str,
                            size: int, crop_fraction: float, max_bank_images: int = 0, seed: int = 0, k: int,
                            temperature: float, batch_size: int,
                            features: Sequence[str] = FEATURES) -> KnnAccuracies:
    """`knn_accuracies` of a data source's splits: the bank `bank_split`
    ('' = the source's train split) capped at `max_bank_images` (0 = all;
    else `knn_subset(N, cap, seed)`), the queries all of `query_split`, in
    the evaluation view (resize to size / crop_fraction, central size x size)."""
    view = dict(size=size, crop_fraction=crop_fraction, seed=seed)
    data = knn.KnnData(knn.source_stream(source, split=bank_split, max_images=max_bank_images, **view),
                       knn.source_stream(source, split=query_split, **view), source.num_classes(), source.name)
    return knn_accuracies(embed_fn, variables, data, k=k, temperature=temperature, batch_size=batch_size,
                          features=features)


class KnnMonitor:
    """The trainer's kNN monitor of a pretraining config: variables ->
    `KnnAccuracies` of backbone and projection features (`knn_accuracies`
    over `knn.monitor_data(source, config)`), every call streaming bank and
    queries again, compiled once. `bank_size` (the bank's images, known
    before the first call) and `describe()` say what it measures on."""

    def __init__(self, config, source):
        self.data = knn.monitor_data(source, config)
        self._embed_fn = make_embed_fn(config)
        self._k, self._temperature, self._batch_size = config.knn_k, config.knn_temperature, config.eval_batch_size

    @property
    def bank_size(self) -> int:
        return self.data.bank.size

    def describe(self) -> str:
        return self.data.describe()

    def __call__(self, variables: Any) -> KnnAccuracies:
        return knn_accuracies(self._embed_fn, variables, self.data, k=self._k, temperature=self._temperature,
                              batch_size=self._batch_size)


def knn_monitor(config, source) -> KnnMonitor:
    """variables -> weighted kNN accuracies ('backbone', 'projection', with
    their `bank_size`) of a pretraining config on `source`'s labelled images."""
    return KnnMonitor(config, source)


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

    @functools.cached_property
    def _embed_tuple(self) -> Callable:
        embed = self._embed
        return lambda v, x: (embed(v, x),)

    def knn_accuracies(self, dataset: knn.KnnData | ArrayDataset, k: int = 200, temperature: float = 0.1,
                       batch_size: int = 256, features: Sequence[str] = FEATURES) -> KnnAccuracies:
        """Weighted kNN top-1 per kind of feature ('backbone', 'projection'),
        with exactly the code of the in-training monitor (`knn_accuracies`;
        `bank_size` says how many images the bank held)."""
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ConfigError(f"features must be among {FEATURES}, got {sorted(unknown)}")
        if self.has_head:
            result = knn_accuracies(self._project, self.variables, dataset, k=k, temperature=temperature,
                                    batch_size=batch_size)
            return KnnAccuracies({name: result[name] for name in features}, result.bank_size, result.num_queries)
        if "projection" in features:
            raise ConfigError("this encoder has no projection head; use features=('backbone',)")
        return knn_accuracies(self._embed_tuple, self.backbone_variables, dataset, k=k, temperature=temperature,
                              batch_size=batch_size, features=("backbone",))


def load(source) -> Encoder:
    """An `Encoder` from anything `formats.load_variables` reads: a
    pretraining workdir (its newest checkpoint), a flax export (.msgpack), a
    torchvision export (.safetensors), an official MoCo checkpoint (.pth.tar)
    or a torch-style state dict of numpy arrays."""
    config, variables = formats.load_variables(source)
    return Encoder(config, jax.tree.map(np.asarray, variables))
