"""Linear classification on frozen MoCo features (the standard protocol).

  python -m moco_jax.linear_eval --pretrained=/tmp/moco --workdir /tmp/moco_linear
  python -m moco_jax.linear_eval --pretrained=/tmp/moco --config.mode=features   # quick CPU check

`mode=full` (default) is the reference `main_lincls.py` of
facebookresearch/moco: the backbone is frozen and runs with BN in inference
mode (the reference calls `model.eval()` during training, so the running
statistics stay those of pretraining); a linear layer (weights N(0, 0.01),
bias 0) on the pooled features is trained with SGD (momentum 0.9, lr 30 per
256 images, weight decay 0) for 100 epochs, lr x0.1 at epochs 60 and 80;
training images get RandomResizedCrop(scale 0.08-1) + horizontal flip,
evaluation images are resized to crop_size / 0.875 and centre-cropped (the
reference's Resize(256) + CenterCrop(224)). Every step is pmap-ed over all
devices (axis "batch"); the classifier state is checkpointed in
`<workdir>/checkpoints` (`moco_jax.io.checkpoint`, with its fallback past a
corrupt checkpoint) and a relaunch with the same workdir resumes.

`mode=features` extracts the features of every image once (evaluation
preprocessing, no augmentation) and fits the same classifier with the same
optimizer on them, on one device: minutes become seconds, at the price of
the augmentation. It does not checkpoint.

Both modes report their training scalars (loss, top1 of the batch, epoch;
full mode also steps_per_sec) at every log step to `log(step, scalars)`,
which the program `moco_jax.linear_eval` points at the pretraining metric
writer (metrics.jsonl, TensorBoard, the console); by default they are
logged as one `linear step N: loss=..., ...` line each. Writing files is
the program's part: this package sits below `moco_jax.training`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from moco_jax import data
from moco_jax.core import augment, image_ops, optim, sharding
from moco_jax.core.config import (FRACTION, RUN_FIELDS, SCALE, STRING, check_fields, check_length,
                                  integer, interval_rules, is_due, one_of, steps, total_steps)
from moco_jax.core.errors import ConfigError
from moco_jax.data.feed import prefetch_to_device
from moco_jax.data.source import local_batch_indices
from moco_jax.eval import knn
from moco_jax.eval.embed import Encoder, load
from moco_jax.io import checkpoint
from moco_jax.io import lock as workdir_lock
from moco_jax.io.saver import CheckpointWriter

LINEAR_MODES = ("full", "features")  # config.mode
# Every field of a linear-probe config (configs/linear_cifar10.py) and what it may hold.
LINEAR_RULES = {
    **RUN_FIELDS, **data.FIELDS, **optim.FIELDS,
    "pretrained": STRING, "mode": one_of(LINEAR_MODES), "max_train_images": integer(0),
    "crop_size": integer(0, " (0 = the encoder's input size)"), "train_crop_scale": SCALE,
    "eval_crop_fraction": FRACTION, **interval_rules("log_every", "checkpoint_every"),
}


def validate_linear_config(config, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the offending field(s) of a linear-probe
    config (configs/linear_cifar10.py); `num_devices`, if given, the devices
    full mode splits each batch over."""
    check_fields(config, LINEAR_RULES)
    check_length(config, ("log_every", "checkpoint_every"))
    if num_devices and config.mode == "full" and config.batch_size % num_devices:
        raise ConfigError(f"batch_size={config.batch_size} must be a multiple of the device count ({num_devices}) "
                          "in mode='full' (or use mode='features', on one device)")


# Fields whose change makes a classifier checkpoint unusable: another encoder
# (feature width) or another dataset (number of classes).
CHECKPOINT_FIELDS = ("pretrained", "dataset")

# Where the scalars of each log step go: log(step, {name: value}).
Log = Callable[[int, Mapping[str, float]], None]


def log_line(step: int, scalars: Mapping[str, float]) -> None:
    """The default `Log`: one console line, numbers to 4 significant digits."""
    logging.info("linear step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))


# ---------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------
def eval_view(images_uint8: jax.Array, crop_size: int, crop_fraction: float, mean, std) -> jax.Array:
    """Resize(int(crop_size / crop_fraction)) + CenterCrop(crop_size) + normalise.

    uint8 (B, H, W, 3) -> float32 (B, crop_size, crop_size, 3). Done as one
    crop-and-resize of the centred square the reference's crop keeps, i.e.
    a side of min(H, W) * crop_size / resize_size input pixels.
    """
    _, height, width, _ = images_uint8.shape
    side = min(height, width) * crop_size / int(crop_size / crop_fraction)
    box = jnp.asarray([(height - side) / 2, (width - side) / 2, side, side], jnp.float32)
    boxes = jnp.broadcast_to(box, (images_uint8.shape[0], 4))
    x = image_ops.crop_and_resize(images_uint8.astype(jnp.float32) / 255.0, boxes, crop_size)
    return image_ops.normalize(x, mean, std)


def train_recipe(crop_size: int, crop_scale, mean, std) -> augment.Recipe:
    """RandomResizedCrop(crop_size, crop_scale) + flip + normalise: the
    reference linear-classification training transform, nothing else."""
    return augment.Recipe(
        crop_size=crop_size, crop_scale=tuple(crop_scale), flip=True, brightness=0.0, contrast=0.0,
        saturation=0.0, hue=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, blur_sigma=(0.1, 2.0),
        mean=tuple(mean), std=tuple(std), order=("flip",),
    )


# ---------------------------------------------------------------------------
# The classifier and its steps.
# ---------------------------------------------------------------------------
def make_classifier(num_classes: int) -> nn.Dense:
    """The reference's `fc`: weights N(0, 0.01), bias 0."""
    return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)


def create_state(config, feature_dim: int, num_classes: int, steps_per_epoch: int) -> train_state.TrainState:
    classifier = make_classifier(num_classes)
    params = classifier.init(jax.random.key(config.seed), jnp.zeros((1, feature_dim)))["params"]
    tx, _ = optim.sgd_optimizer(config, steps_per_epoch)
    return train_state.TrainState.create(apply_fn=classifier.apply, params=params, tx=tx)


def _loss_and_metrics(params, apply_fn, features, labels):
    logits = apply_fn({"params": params}, features)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"loss": loss, "top1": (jnp.argmax(logits, -1) == labels).mean()}


def classifier_step(state, features, labels, axis_name: str | None = None):
    """One SGD step on (B, D) features and (B,) labels; gradients and metrics
    are averaged over `axis_name` when given (pmap)."""
    grads, metrics = jax.grad(_loss_and_metrics, has_aux=True)(state.params, state.apply_fn, features, labels)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    return state.apply_gradients(grads=grads), metrics


def make_full_train_step(backbone: nn.Module, recipe: augment.Recipe, seed: int):
    """pmap-ed (state, backbone variables, uint8 images (n, b, H, W, 3),
    labels (n, b)) -> (state, metrics). The augmentation key is derived from
    (seed, step, device), so a resumed run draws the same crops."""

    def step(state, backbone_variables, images, labels):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        rng = jax.random.fold_in(rng, jax.lax.axis_index(sharding.AXIS))
        x = augment.augment_view(rng, images, recipe)
        features = jax.lax.stop_gradient(backbone.apply(backbone_variables, x, train=False))
        return classifier_step(state, features, labels, axis_name=sharding.AXIS)

    return jax.pmap(step, axis_name=sharding.AXIS, donate_argnums=(0,))


def make_full_logits_fn(backbone: nn.Module, classifier_apply, crop_size: int, crop_fraction: float, mean, std):
    """pmap-ed (classifier params, backbone variables, uint8 (n, b, H, W, 3))
    -> logits (n, b, C), with the evaluation preprocessing."""

    def logits(params, backbone_variables, images):
        x = eval_view(images, crop_size, crop_fraction, mean, std)
        return classifier_apply({"params": params}, backbone.apply(backbone_variables, x, train=False))

    return jax.pmap(logits, axis_name=sharding.AXIS)


def topk_accuracies(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """(N, C) logits, (N,) labels -> {"top1": ..., "top5": ...} in [0, 1]."""
    order = np.argsort(-logits, axis=1)
    return {f"top{k}": float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1))) for k in ks}


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------
def labelled_batches(images: np.ndarray, labels: np.ndarray, global_batch: int, seed: int, start_step: int = 0,
                     num_local_devices: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (uint8 (n, b, H, W, 3), int32 (n, b)) batches of this process's
    share in the order of every source (`local_batch_indices`): shuffled per
    epoch, resumable at any step, last partial batch dropped."""
    indices = local_batch_indices(len(images), global_batch, seed, start_step, jax.process_index(),
                                  jax.process_count(), num_local_devices)
    return ((images[idx].reshape(num_local_devices, -1, *images.shape[1:]),
             labels[idx].astype(np.int32).reshape(num_local_devices, -1)) for idx in indices)


def padded_batches(images: np.ndarray, batch: int, num_devices: int) -> Iterator[np.ndarray]:
    """(N, H, W, 3) in order as (num_devices, batch // num_devices, H, W, 3)
    batches, the last zero-padded (callers drop the padded rows)."""
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        yield chunk.reshape(num_devices, -1, *chunk.shape[1:])


def load_dataset(config) -> data.ArrayDataset:
    """The labelled train/test images of `config.dataset`, in host memory.

    In-memory sources (digits, cifar10_arrays) as they are. Image folders and
    tensorflow-datasets names are decoded once, the shorter side resized to
    `image_size` and centre-cropped to a square (at most `max_train_images`
    training images, 0 = all). Both modes then work on those squares; for
    full-mode training this means RandomResizedCrop of the central square
    rather than of the whole photo. Holding the images in memory suits
    Imagenette-sized data, not the full ImageNet (a streaming source is not
    implemented).
    """
    return data.open_source(config).labelled_arrays(
        size=config.image_size, crop_fraction=1.0, max_train_images=config.max_train_images, seed=config.seed)


def resolve_config(config, encoder: Encoder) -> ml_collections.ConfigDict:
    """`config` with its 0 fields filled in from the encoder's config:
    crop_size (the encoder's input size) and, for the dataset the encoder was
    pretrained on, image_size (e.g. the digits' upsampled size)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.crop_size:
        config.crop_size = int(encoder.config.crop_size)
    if not config.image_size and encoder.config.to_dict().get("dataset") == config.dataset:
        config.image_size = int(encoder.config.image_size)
    return config


# ---------------------------------------------------------------------------
# The two modes.
# ---------------------------------------------------------------------------
def run_full(config, encoder: Encoder, dataset: data.ArrayDataset, workdir: str | None = None,
             fresh_start: bool = False, log: Log | None = None) -> dict[str, Any]:
    """The reference protocol on all local devices. Returns top1, top5 (test
    split, in [0, 1]), the last `step`, the logged `history` and the host
    `state`. With a `workdir`, the probe holds its lock and resumes from its
    checkpoints (`fresh_start`: start over if none of them is usable); a
    relaunch of a probe checkpointed at its last step trains nothing and only
    evaluates. Each log step's scalars go to `log` (default `log_line`)."""
    with workdir_lock.holding(workdir):
        return _run_full(config, encoder, dataset, workdir, fresh_start, log or log_line)


def _run_full(config, encoder, dataset, workdir, fresh_start, log) -> dict[str, Any]:
    n = jax.local_device_count()
    spe = data.steps_per_epoch(len(dataset.train_images), config.batch_size)
    total = total_steps(config, spe)
    state = create_state(config, encoder.feature_dim, dataset.num_classes, spe)
    if workdir:
        newest = checkpoint.restore_newest(workdir, state, config, CHECKPOINT_FIELDS, fresh_start)
        state = newest[0] if newest else state
    start = int(state.step)
    backbone, mean, std = encoder.backbone, encoder.mean, encoder.std
    p_backbone = sharding.replicate(encoder.backbone_variables)
    history = []
    if start >= total:
        logging.info("linear probe in %s: checkpoint %d is the last step (of %d): nothing to train, only the final "
                     "evaluation runs", workdir, start, total)
    else:
        state, history = _train_full(config, encoder, dataset, workdir, state, start, total, spe, p_backbone, log)
    p_logits = make_full_logits_fn(backbone, state.apply_fn, config.crop_size, config.eval_crop_fraction, mean, std)
    p_params = sharding.replicate(state.params)
    eval_batch = -(-config.eval_batch_size // n) * n
    logits = [p_logits(p_params, p_backbone, sharding.shard(x))
              for x in padded_batches(dataset.test_images, eval_batch, n)]
    logits = np.concatenate([np.asarray(x).reshape(-1, x.shape[-1]) for x in logits])[: len(dataset.test_images)]
    return {**topk_accuracies(logits, dataset.test_labels), "step": int(state.step), "history": history,
            "state": state}


def _train_full(config, encoder, dataset, workdir, state, start, total, spe, p_backbone, log):
    """Steps start+1 .. total of `_run_full`: (host state, logged history)."""
    n = jax.local_device_count()
    log_every, checkpoint_every = steps(config, "log_every", spe), steps(config, "checkpoint_every", spe)
    saver = CheckpointWriter(workdir) if workdir else None
    recipe = train_recipe(config.crop_size, config.train_crop_scale, encoder.mean, encoder.std)
    p_step = make_full_train_step(encoder.backbone, recipe, config.seed)
    p_state = sharding.replicate(state)
    batches = prefetch_to_device(labelled_batches(
        dataset.train_images, dataset.train_labels, config.batch_size, config.seed, start, n))
    history, pending, t0 = [], [], time.perf_counter()
    for step in range(start + 1, total + 1):
        images, labels = next(batches)
        p_state, metrics = p_step(p_state, p_backbone, images, labels)
        pending.append(metrics)
        if is_due(step, log_every, total):
            summary = {k: float(np.mean([sharding.unreplicate(m)[k] for m in pending])) for k in pending[0]}
            summary["epoch"] = step / spe
            summary["steps_per_sec"] = len(pending) / (time.perf_counter() - t0)
            log(step, summary)
            history.append({"step": step, **summary})
            pending, t0 = [], time.perf_counter()
        if saver is not None and is_due(step, checkpoint_every, total):
            saver.save(sharding.unreplicate(p_state), config)
    if saver is not None:
        saver.finish()
    return sharding.unreplicate(p_state), history


def make_features_fn(encoder: Encoder, crop_size: int, crop_fraction: float):
    """uint8 (B, H, W, 3) -> (B, D) backbone features with the evaluation
    preprocessing, jitted once for every batch of the run."""
    backbone, mean, std = encoder.backbone, encoder.mean, encoder.std
    fn = jax.jit(lambda v, x: backbone.apply(v, eval_view(x, crop_size, crop_fraction, mean, std), train=False))
    return lambda x: fn(encoder.backbone_variables, x)


def fit_on_features(config, train_features: np.ndarray, train_labels: np.ndarray, num_classes: int,
                    log: Log | None = None):
    """The classifier trained with the protocol's optimizer and schedule on
    fixed (N, D) features, mini-batches in the order of every source; each
    log step's scalars go to `log` (default `log_line`)."""
    log = log or log_line
    spe = data.steps_per_epoch(len(train_features), config.batch_size)
    total = total_steps(config, spe)
    log_every = steps(config, "log_every", spe)
    state = create_state(config, train_features.shape[1], num_classes, spe)
    step_fn = jax.jit(classifier_step, donate_argnums=(0,))
    features, labels = jnp.asarray(train_features), jnp.asarray(train_labels, jnp.int32)
    history = []
    for step, idx in zip(range(1, total + 1), local_batch_indices(len(train_features), config.batch_size, config.seed)):
        state, metrics = step_fn(state, features[idx], labels[idx])
        if is_due(step, log_every, total):
            summary = {**{k: float(v) for k, v in metrics.items()}, "epoch": step / spe}
            log(step, summary)
            history.append({"step": step, **summary})
    return state, history


def run_features(config, encoder: Encoder, dataset: data.ArrayDataset, log: Log | None = None) -> dict[str, Any]:
    """Features once, classifier on them. Same return value as `run_full`."""
    features_fn = make_features_fn(encoder, config.crop_size, config.eval_crop_fraction)
    extract = lambda x: knn.extract_features(features_fn, x, min(config.eval_batch_size, len(x)))  # noqa: E731
    train_features, test_features = extract(dataset.train_images), extract(dataset.test_images)
    state, history = fit_on_features(config, train_features, dataset.train_labels, dataset.num_classes, log)
    logits = np.asarray(state.apply_fn({"params": state.params}, test_features))
    return {**topk_accuracies(logits, dataset.test_labels), "step": int(state.step), "history": history,
            "state": state}


def evaluate(config, workdir: str | None = None, encoder: Encoder | None = None,
             fresh_start: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Linear evaluation of `config.pretrained` (or of `encoder` if given),
    in `config.mode` 'full' or 'features'; checkpoints in `workdir` (full);
    each log step's scalars to `log` (default: a console line). Returns
    top1, top5, step, history and state (see `run_full`)."""
    validate_linear_config(config, jax.device_count())
    if encoder is None:
        if not config.pretrained:
            raise ConfigError("pretrained is not set: pass --pretrained=<a pretraining workdir or an exported "
                              "encoder> (see moco_jax.pretrained.load)")
        encoder = load(config.pretrained)
    config = resolve_config(config, encoder)
    dataset = load_dataset(config)
    if config.mode == "full":
        return run_full(config, encoder, dataset, workdir, fresh_start, log)
    if config.mode == "features":
        return run_features(config, encoder, dataset, log)
    raise ConfigError(f"mode={config.mode!r} must be one of {', '.join(map(repr, LINEAR_MODES))}")
