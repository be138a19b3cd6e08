"""The training loop: data in, pmap-ed MoCo steps, logging, kNN evaluation."""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moco_jax import augment, data, knn, models, moco, optim, sharding, state as state_lib
from moco_jax.validation import validate_config


def augmentation_recipe(config) -> augment.Recipe:
    return augment.recipe_by_name(config.augmentation, config.crop_size, crop_scale=tuple(config.crop_scale))


def make_train_step(config) -> Callable:
    """The pmap-ed step: (replicated state, uint8 images (n, B_local, H, W, 3))
    -> (state, metrics). The state's buffers are donated: updated in place."""
    recipe = augmentation_recipe(config)
    hp = moco.MoCoHParams(
        temperature=config.temperature,
        ema_momentum=config.momentum,
        shuffle_bn=config.shuffle_bn,
        symmetric=config.symmetric_loss,
        axis_name=sharding.AXIS,
    )
    views = lambda rng, images: augment.two_views(rng, images, recipe)  # noqa: E731
    step = functools.partial(moco.train_step, hp=hp, views=views)
    return jax.pmap(step, axis_name=sharding.AXIS, donate_argnums=(0,))


def make_embed_fn(encoder: models.MoCoEncoder, config) -> Callable:
    """(variables, uint8 images (B, H, W, 3)) -> (backbone features, unit
    projections), in eval mode (BN running statistics), as the kNN monitor and
    downstream users see the encoder."""
    recipe = augmentation_recipe(config)
    mean, std = np.asarray(recipe.mean, np.float32), np.asarray(recipe.std, np.float32)

    @jax.jit
    def embed(variables, images):
        x = images.astype(jnp.float32) / 255.0
        if x.shape[1:3] != (config.crop_size, config.crop_size):
            x = jax.image.resize(x, (x.shape[0], config.crop_size, config.crop_size, 3), "linear")
        features, z = encoder.apply(variables, (x - mean) / std, train=False)
        return features, moco.l2_normalize(z)

    return embed


def knn_accuracies(embed: Callable, variables: Any, dataset: data.ArrayDataset, config) -> dict[str, float]:
    """Weighted kNN top-1 on the test split, bank = un-augmented train images,
    for backbone features and for the projection output (published numbers
    use either; the CIFAR demo uses the projection)."""
    result = {}
    for i, name in enumerate(("backbone", "projection")):
        fn = lambda x, i=i: embed(variables, x)[i]  # noqa: E731
        bank = knn.extract_features(fn, dataset.train_images, config.eval_batch_size)
        queries = knn.extract_features(fn, dataset.test_images, config.eval_batch_size)
        result[name] = knn.knn_accuracy(
            queries, dataset.test_labels, bank, dataset.train_labels, dataset.num_classes,
            k=config.knn_k, temperature=config.knn_temperature,
        )
    return result


class MetricsLog:
    """Step metrics: absl log lines, plus JSON lines in `workdir` if given."""

    def __init__(self, workdir: str | None):
        self._file = None
        if workdir and jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self._file:
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def summarize(pending: list[dict[str, jax.Array]], step: int) -> dict[str, float]:
    """Mean of the metrics of the steps since the last log. This is the only
    place the host waits for the devices; the NaN guard lives here too."""
    stacked = jax.device_get(pending)
    summary = {k: float(np.mean([np.asarray(m[k])[0] for m in stacked])) for k in stacked[0]}
    if not np.isfinite(summary["loss"]):
        raise FloatingPointError(f"non-finite loss {summary['loss']} at step {step}; stopping")
    return summary


def progress(iterable: range, enabled: bool) -> Iterator[int]:
    """A console progress bar with ETA (tqdm), on process 0 only."""
    if not enabled:
        return iter(iterable)
    import tqdm  # noqa: PLC0415 - optional nicety, imported where used

    return iter(tqdm.tqdm(iterable, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0))


def train_and_evaluate(config, workdir: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Pretrain MoCo with `config`; return the kNN accuracies and the log.

    Returns a dict with `knn_random` / `knn_trained` (backbone and projection
    accuracies before and after training), `history` (the logged metrics), and
    the final host `state`.
    """
    num_devices = jax.device_count()
    validate_config(config, num_devices)
    dataset = data.load_array_dataset(config.dataset, config.data_dir or None, config.image_size)
    steps_per_epoch = data.steps_per_epoch(len(dataset.train_images), config.batch_size)
    total_steps = optim.total_train_steps(config, steps_per_epoch)
    logging.info(
        "%s: %d train images, %d steps/epoch, %d steps, %d devices, global batch %d",
        config.dataset, len(dataset.train_images), steps_per_epoch, total_steps, num_devices, config.batch_size,
    )

    encoder = models.build_encoder(config, axis_name=sharding.AXIS)
    tx, lr_schedule = optim.make_optimizer(config, steps_per_epoch)
    image_shape = (config.crop_size, config.crop_size, 3)
    state = state_lib.create_train_state(
        jax.random.key(config.seed), encoder, tx, image_shape, config.queue_size, config.embed_dim
    )
    embed = make_embed_fn(encoder, config)
    knn_random = knn_accuracies(embed, {"params": state.params, "batch_stats": state.batch_stats}, dataset, config)

    p_state = state_lib.to_devices(state)
    del state  # its buffers now live on the devices
    p_train_step = make_train_step(config)
    batches = data.prefetch_to_device(
        data.array_batches(
            dataset.train_images, config.batch_size, config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_local_devices=jax.local_device_count(),
        )
    )

    log, history, pending = MetricsLog(workdir), [], []
    last_time, last_step = time.perf_counter(), 0
    for step in progress(range(1, total_steps + 1), show_progress and jax.process_index() == 0):
        p_state, metrics = p_train_step(p_state, next(batches))
        pending.append(metrics)
        if step % config.log_every_steps == 0 or step == total_steps:
            summary = summarize(pending, step)
            now = time.perf_counter()
            images_per_sec = (step - last_step) * config.batch_size / (now - last_time)
            summary.update(
                learning_rate=float(lr_schedule(step - 1)),
                momentum=float(config.momentum),
                images_per_sec=images_per_sec,
                images_per_sec_per_device=images_per_sec / num_devices,
                step_time_ms=1000 * (now - last_time) / (step - last_step),
                epoch=step / steps_per_epoch,
            )
            log.write(step, summary)
            history.append({"step": step, **summary})
            pending, last_time, last_step = [], now, step
    log.close()

    state = state_lib.from_devices(p_state)
    knn_trained = knn_accuracies(embed, {"params": state.params, "batch_stats": state.batch_stats}, dataset, config)
    return {"knn_random": knn_random, "knn_trained": knn_trained, "history": history, "state": state}
