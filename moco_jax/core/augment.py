"""MoCo's augmentation recipes and the views they make, in pure JAX.

A `Recipe` is the static description of one reference torchvision pipeline
(MoCo v1, v2 and v3, the CIFAR-10 demo); `augment_view`, `two_views` and
`make_views_fn` apply it on the accelerator, inside the (p)mapped training
step, to a whole uint8 NHWC batch, with the batched operations of
`moco_jax.core.image_ops` (whose docstring states the conventions: NHWC, the
randomness of every op given as uniforms, no Python branching on traced
values).

Why uniforms rather than a PRNG key per op: the pipelines (`augment_view`,
`two_views`) make one `jax.random.uniform` draw for a whole step and hand each
op its columns. Every separate threefry draw is its own sizeable program, and
on XLA:CPU a handful of them cost more to compile than all the image maths
(measured: 6 draws 3.9 s vs 1 draw 0.9 s).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.core import image_ops
from moco_jax.core.config import SCALE, integer, one_of
from moco_jax.core.errors import ConfigError


# --------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------

_STEPS = ('grayscale', 'jitter', 'blur', 'solarize', 'flip')


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Static description of one MoCo augmentation pipeline (hashable).

    `order` lists the steps after the crop, in the reference torchvision
    Compose order; a step whose probability/strength is zero is a no-op.
    `blur_p` and `solarize_p` are one probability for both views, or a pair
    (first view, second view): BYOL's and MoCo v3's asymmetric views.
    """
    crop_size: int
    crop_scale: Tuple[float, float]
    flip: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_p: float
    grayscale_p: float
    blur_p: float | Tuple[float, float]
    blur_sigma: Tuple[float, float]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    order: Tuple[str, ...] = ('jitter', 'grayscale', 'blur', 'flip')
    solarize_p: float | Tuple[float, float] = 0.0

    def __post_init__(self):
        unknown = set(self.order) - set(_STEPS)
        if unknown:
            raise ValueError(f"unknown steps {sorted(unknown)}; known: {_STEPS}")

    def view_probabilities(self, view: int) -> Tuple[float, float]:
        """(blur p, solarize p) of view 0 (query / x1) or 1 (key / x2)."""
        return tuple(p[view] if isinstance(p, (tuple, list)) else p for p in (self.blur_p, self.solarize_p))

    def _in_some_view(self, step: str, index: int) -> bool:
        return step in self.order and max(self.view_probabilities(0)[index], self.view_probabilities(1)[index]) > 0

    @property
    def uses_blur(self) -> bool:
        return self._in_some_view('blur', 0)

    @property
    def uses_solarize(self) -> bool:
        return self._in_some_view('solarize', 1)


def moco_v1_recipe(crop_size: int = 224) -> Recipe:
    """MoCo v1 (facebookresearch/moco main_moco.py, `--aug-plus` off).

    Compose([RandomResizedCrop(224, scale=(0.2, 1.)), RandomGrayscale(0.2),
    ColorJitter(0.4, 0.4, 0.4, 0.4), RandomHorizontalFlip(), ToTensor(),
    Normalize(ImageNet mean/std)]).
    """
    return Recipe(crop_size=crop_size, crop_scale=(0.2, 1.0), flip=True,
                  brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4,
                  jitter_p=1.0, grayscale_p=0.2, blur_p=0.0, blur_sigma=(0.1, 2.0),
                  mean=image_ops.IMAGENET_MEAN, std=image_ops.IMAGENET_STD,
                  order=('grayscale', 'jitter', 'flip'))


def moco_v2_recipe(crop_size: int = 224) -> Recipe:
    """MoCo v2 (facebookresearch/moco main_moco.py `--aug-plus`, after SimCLR).

    Compose([RandomResizedCrop(224, scale=(0.2, 1.)),
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), RandomGrayscale(0.2),
    RandomApply([GaussianBlur([.1, 2.])], p=0.5), RandomHorizontalFlip(),
    ToTensor(), Normalize(ImageNet mean/std)]).
    """
    return Recipe(crop_size=crop_size, crop_scale=(0.2, 1.0), flip=True,
                  brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                  jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0),
                  mean=image_ops.IMAGENET_MEAN, std=image_ops.IMAGENET_STD,
                  order=('jitter', 'grayscale', 'blur', 'flip'))


def cifar_recipe(crop_size: int = 32) -> Recipe:
    """The official MoCo CIFAR-10 demo (facebookresearch/moco colab notebook).

    Compose([RandomResizedCrop(32), RandomHorizontalFlip(p=0.5),
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), RandomGrayscale(0.2),
    ToTensor(), Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])]).
    The demo flips before jittering; flipping commutes with the colour ops,
    but the order is kept as written.
    """
    return Recipe(crop_size=crop_size, crop_scale=(0.08, 1.0), flip=True,
                  brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                  jitter_p=0.8, grayscale_p=0.2, blur_p=0.0, blur_sigma=(0.1, 2.0),
                  mean=image_ops.CIFAR10_MEAN, std=image_ops.CIFAR10_STD,
                  order=('flip', 'jitter', 'grayscale'))


def moco_v3_recipe(crop_size: int = 224) -> Recipe:
    """MoCo v3 (facebookresearch/moco-v3 main_moco.py), BYOL's asymmetric pair.

    Both views: RandomResizedCrop(224, scale=(crop_min=0.08, 1.)),
    RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), RandomGrayscale(0.2),
    RandomApply([GaussianBlur([.1, 2.])], p=1.0 | 0.1),
    RandomApply([Solarize()], p=0 | 0.2) (second view only), RandomHorizontalFlip(),
    ToTensor(), Normalize(ImageNet mean/std). (Its ResNet-50 runs use crop_min 0.2.)
    """
    return Recipe(crop_size=crop_size, crop_scale=(0.08, 1.0), flip=True,
                  brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                  jitter_p=0.8, grayscale_p=0.2, blur_p=(1.0, 0.1), blur_sigma=(0.1, 2.0),
                  mean=image_ops.IMAGENET_MEAN, std=image_ops.IMAGENET_STD,
                  order=('jitter', 'grayscale', 'blur', 'solarize', 'flip'), solarize_p=(0.0, 0.2))


def cifar_v3_recipe(crop_size: int = 32) -> Recipe:
    """`moco_v3_recipe` for 32x32 CIFAR images: the same pair without the
    blur (a Gaussian blur of sigma up to 2 erases a 32-pixel image; SimCLR
    and solo-learn leave it out on CIFAR too), CIFAR-10 mean/std."""
    return dataclasses.replace(moco_v3_recipe(crop_size), blur_p=0.0,
                               mean=image_ops.CIFAR10_MEAN, std=image_ops.CIFAR10_STD)


_RECIPES = {'moco_v1': moco_v1_recipe, 'moco_v2': moco_v2_recipe, 'cifar': cifar_recipe,
            'moco_v3': moco_v3_recipe, 'cifar_v3': cifar_v3_recipe}
RECIPE_NAMES = tuple(_RECIPES)  # the values of config.augmentation
# The fields of a pretraining config the views read (`recipe_from_config`, the host crops).
FIELDS = {"augmentation": one_of(RECIPE_NAMES), "crop_size": integer(1), "crop_scale": SCALE}


def recipe_by_name(name: str, crop_size: Optional[int] = None, **overrides) -> Recipe:
    """Recipe 'moco_v1', 'moco_v2' or 'cifar', with fields optionally replaced.

    crop_size None keeps the recipe's default (224, 224, 32).
    """
    if name not in _RECIPES:
        raise ConfigError(f"augmentation={name!r} must be one of {', '.join(map(repr, RECIPE_NAMES))}")
    recipe = _RECIPES[name]() if crop_size is None else _RECIPES[name](crop_size)
    return dataclasses.replace(recipe, **overrides)


def recipe_from_config(config) -> Recipe:
    """The recipe an experiment config trains with: `config.augmentation` at
    `config.crop_size` with `config.crop_scale`. Its mean/std are also the
    normalisation every consumer of the encoder must apply."""
    return recipe_by_name(config.augmentation, config.crop_size, crop_scale=tuple(config.crop_scale))


def normalization(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) over RGB in [0, 1] that an encoder trained with `config`
    expects its inputs normalised with."""
    recipe = recipe_from_config(config)
    return tuple(recipe.mean), tuple(recipe.std)


# --------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------

_CROP_ATTEMPTS = 10
# Uniforms each pipeline step consumes per image (see the module docstring).
_UNIFORMS = {'crop': 4 * _CROP_ATTEMPTS, 'grayscale': 1, 'jitter': 9, 'blur': 2, 'flip': 1}


def _uniform_columns(recipe: Recipe) -> dict:
    # Solarisation's column comes last and only where a recipe solarises, so
    # that the recipes without it draw exactly what they always drew.
    return {**_UNIFORMS, 'solarize': 1} if recipe.uses_solarize else _UNIFORMS


def _view_uniforms(rng, batch_size: int, recipe: Recipe, leading=()):
    """All the randomness of one (or `leading` many) view(s) in one draw."""
    return jax.random.uniform(rng, leading + (batch_size, sum(_uniform_columns(recipe).values())))


def _two_view_probabilities(recipe: Recipe):
    """(2, 2) float32: row v = (blur p, solarize p) of view v, for the vmap over views."""
    return jnp.asarray([recipe.view_probabilities(0), recipe.view_probabilities(1)], jnp.float32)


def _columns(u, recipe: Recipe) -> dict:
    """u: (B, sum of `_uniform_columns(recipe)`) -> {step: its (B, n) columns}.
    Every step owns a fixed column range, so a step's randomness does not
    depend on which other steps the recipe enables."""
    columns = _uniform_columns(recipe)
    ends = np.cumsum(list(columns.values()))
    return {name: u[:, end - n:end] for (name, n), end in zip(columns.items(), ends)}


def _augment_view_u(u, images_uint8, recipe: Recipe, crop: bool, probabilities=None):
    """`augment_view` given uniforms u: (B, sum of `_uniform_columns(recipe)`)
    and (blur p, solarize p), possibly traced (default: the first view's)."""
    _, height, width, _ = images_uint8.shape
    size = recipe.crop_size
    cols = _columns(u, recipe)
    x = images_uint8.astype(jnp.float32) / 255.0
    if crop:
        boxes = image_ops.crop_boxes(cols['crop'], height, width, recipe.crop_scale)
        x = image_ops.crop_and_resize(x, boxes, size)
    elif (height, width) != (size, size):
        raise ValueError(f"crop=False needs (B, {size}, {size}, 3) images, "
                         f"got {images_uint8.shape}")
    return _after_crop(cols, x, recipe, probabilities)


def _after_crop(cols: dict, x, recipe: Recipe, probabilities=None):
    """The recipe's steps after the crop, then normalisation: x float32 (B, S,
    S, 3) in [0, 1]; `cols` from `_columns`."""
    blur_p, solarize_p = recipe.view_probabilities(0) if probabilities is None else probabilities
    for step in recipe.order:
        if step == 'grayscale' and recipe.grayscale_p > 0:
            x = image_ops.grayscale(cols[step][:, 0], x, recipe.grayscale_p)
        elif step == 'jitter' and recipe.jitter_p > 0:
            x = image_ops.color_jitter(cols[step], x, recipe.brightness, recipe.contrast,
                                       recipe.saturation, recipe.hue, recipe.jitter_p)
        elif step == 'blur' and recipe.uses_blur:
            x = image_ops.blur(cols[step], x, blur_p, recipe.blur_sigma)
        elif step == 'solarize' and recipe.uses_solarize:
            x = image_ops.solarize(cols[step][:, 0], x, solarize_p)
        elif step == 'flip' and recipe.flip:
            x = image_ops.flip(cols[step][:, 0], x, 0.5)
    return image_ops.normalize(x, recipe.mean, recipe.std)


def _slot_view_u(u, slots, views, recipe: Recipe, probabilities):
    """The view of host-decoded slots (`image_ops.resize_views`: the box cut
    and resized here), then the recipe's steps, with the same uniforms'
    columns as a host-cropped view draws."""
    x = image_ops.resize_views(slots, views, recipe.crop_size) / 255.0
    return _after_crop(_columns(u, recipe), x, recipe, probabilities)


def augment_view(rng, images_uint8, recipe: Recipe, crop: bool = True):
    """One MoCo view: crop, then the recipe's steps in order, then normalize.

    The torchvision Compose of the recipe (see its constructor), applied per
    image. The crop is RandomResizedCrop(crop_size, recipe.crop_scale, ratio
    3/4-4/3) via the same sampling as `image_ops.crop_boxes` and
    `image_ops.crop_and_resize`; the blur kernel size is
    `image_ops.default_blur_kernel_size(crop_size)`.

    Args:
      rng: PRNG key.
      images_uint8: uint8 (B, H, W, 3); with crop=False the host already did
        the random resized crop and this must be (B, S, S, 3), S = crop_size.
      recipe: a `Recipe` (static).
    Returns:
      float32 (B, S, S, 3), normalised.
    """
    u = _view_uniforms(rng, images_uint8.shape[0], recipe)
    return _augment_view_u(u, images_uint8, recipe, crop)


def two_views(rng, images_uint8, recipe: Recipe, crop: bool = True):
    """The query and key views of MoCo's `TwoCropsTransform`, independent.

    images_uint8: uint8 (B, H, W, 3). Returns (x_q, x_k), each float32
    (B, S, S, 3) with S = recipe.crop_size.
    """
    # One draw for both views and the pipeline vmapped over the view axis:
    # each op is compiled once rather than twice.
    u = _view_uniforms(rng, images_uint8.shape[0], recipe, leading=(2,))
    views = jax.vmap(lambda uv, pv: _augment_view_u(uv, images_uint8, recipe, crop, pv))(
        u, _two_view_probabilities(recipe))
    return views[0], views[1]


def make_views_fn(recipe: Recipe, host_cropped: bool):
    """The step's `views` function: (rng, per-device batch) -> (x_q, x_k).

    host_cropped False: batch is uint8 (B, H, W, 3) whole images; the two
      RandomResizedCrops happen here (`two_views`).
    host_cropped True: batch is uint8 (B, 2, S, S, 3), the two crops the host
      already cut (`moco_jax.data.pipelines.tf_ops.two_crops`, same box
      sampling), or the host's decoded images and boxes, (slots uint8 (B, P,
      3), views int32 (B, 2, 4)) (`pillow_ops.views_into`), each box cut and
      resized here; the rest of the recipe runs here, independently per view.
    Returns float32 (B, S, S, 3) views, normalised.
    """
    if not host_cropped:
        return lambda rng, images: two_views(rng, images, recipe, crop=True)

    def host_cropped_views(rng, crops):
        if isinstance(crops, (tuple, list)):
            return _slot_views(rng, *crops)
        if crops.ndim != 5 or crops.shape[1] != 2:
            raise ValueError(f"host-cropped batches are (B, 2, S, S, 3), got {crops.shape}")
        u = _view_uniforms(rng, crops.shape[0], recipe, leading=(2,))
        pairs = jnp.moveaxis(crops, 1, 0)  # (2, B, S, S, 3): view v's crops
        views = jax.vmap(lambda uv, x, pv: _augment_view_u(uv, x, recipe, False, pv))(
            u, pairs, _two_view_probabilities(recipe))
        return views[0], views[1]

    def _slot_views(rng, slots, boxes):
        if slots.ndim != 3 or boxes.shape[1:] != (2, 4):
            raise ValueError(f"host-decoded batches are (slots (B, P, 3), views (B, 2, 4)), got "
                             f"{slots.shape}, {boxes.shape}")
        u = _view_uniforms(rng, slots.shape[0], recipe, leading=(2,))
        views = jax.vmap(lambda uv, b, pv: _slot_view_u(uv, slots, b, recipe, pv))(
            u, jnp.moveaxis(boxes, 1, 0), _two_view_probabilities(recipe))
        return views[0], views[1]

    return host_cropped_views
