"""The training loop: data in, pmap-ed MoCo steps, logging, kNN evaluation."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from moco_jax import data
from moco_jax.core import augment, models, moco, optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.core.config import is_due, steps, total_steps, validate_config
from moco_jax.data.feed import prefetch_to_device
from moco_jax.eval import embed, knn
from moco_jax.io import checkpoint
from moco_jax.training import metrics


def make_train_step(config, host_cropped: bool = False) -> Callable:
    """The pmap-ed step: (replicated state, uint8 batch) -> (state, metrics).

    The batch is (n, B_local, H, W, 3) whole images (cropped on the device),
    or (n, B_local, 2, S, S, 3) host crops when `host_cropped` (see
    `data.Source.train_batches`). The state's buffers are donated: updated in place."""
    recipe = augment.recipe_from_config(config)
    hp = moco.MoCoHParams(
        temperature=config.temperature,
        ema_momentum=config.momentum,
        shuffle_bn=config.shuffle_bn,
        shuffle_mode=config.shuffle_mode,
        symmetric=config.symmetric_loss,
        axis_name=sharding.AXIS,
    )
    views = augment.make_views_fn(recipe, host_cropped)
    step = functools.partial(moco.train_step, hp=hp, views=views)
    return jax.pmap(step, axis_name=sharding.AXIS, donate_argnums=(0,))


def pretrain_batches(source: data.Source, config, start_step: int) -> Iterator:
    """This process's share of every global batch from `start_step` on."""
    return source.train_batches(
        global_batch=config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_local_devices=jax.local_device_count(), crop_size=config.crop_size,
        crop_scale=tuple(config.crop_scale))


def knn_monitor(config, dataset: data.ArrayDataset) -> Callable[[Any], dict[str, float]]:
    """variables -> weighted kNN accuracies of backbone and projection
    features on `dataset` (the function compiles once)."""
    embed_fn = embed.make_embed_fn(config)
    return lambda variables: embed.knn_accuracies(
        embed_fn, variables, dataset, k=config.knn_k, temperature=config.knn_temperature,
        batch_size=config.eval_batch_size)


def summarize(pending: list[dict[str, jax.Array]], step: int) -> dict[str, float]:
    """Mean of the metrics of the steps since the last log. Within the
    training steps, this and `assert_finite` are the only places the host
    waits for the devices (the kNN monitor and checkpoints wait too)."""
    stacked = jax.device_get(pending)
    summary = {k: float(np.mean([np.asarray(m[k])[0] for m in stacked])) for k in stacked[0]}
    assert_finite([summary["loss"], summary["grad_norm"]], step)
    return summary


def assert_finite(values, step: int) -> None:
    """The NaN guard on losses and gradient norms: stop before a non-finite
    state can be logged as fine or saved over the last good checkpoint."""
    values = np.asarray(jax.device_get(values), np.float64)
    if not np.all(np.isfinite(values)):
        raise FloatingPointError(
            f"non-finite loss or gradient at or before step {step}; training stopped. The last good checkpoint "
            "(if any) is kept; lower the learning rate or check the data before relaunching."
        )


def progress(steps: range, total: int, enabled: bool) -> Iterator[int]:
    """A console progress bar with ETA (tqdm), on process 0 only."""
    if not enabled:
        return iter(steps)
    import tqdm  # noqa: PLC0415 - optional nicety, imported where used

    return iter(tqdm.tqdm(steps, total=total, initial=steps.start - 1, desc="train", unit="step",
                          dynamic_ncols=True, mininterval=1.0))


def _encoder_variables(state: state_lib.MoCoState) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def train_and_evaluate(config, workdir: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Pretrain MoCo with `config`, resuming from `workdir` if it holds a
    checkpoint; return the kNN accuracies and the log.

    Returns a dict with `knn_random` / `knn_trained` (backbone and projection
    accuracies before and after training), `history` (the metrics logged by
    this run), and the final host `state`.
    """
    num_devices = jax.device_count()
    validate_config(config, num_devices)
    if workdir:
        checkpoint.check_writable(workdir)
    source = data.open_source(config)
    knn_fn = knn_monitor(config, knn.monitor_dataset(source, config))  # un-augmented bank and queries
    source = source.with_train_subset(config.train_subset, config.seed)
    steps_per_epoch = data.steps_per_epoch(source.num_train_examples, config.batch_size)
    total = total_steps(config, steps_per_epoch)
    logging.info(
        "%s: %d train images, %d steps/epoch, %d steps, %d devices, global batch %d",
        config.dataset, source.num_train_examples, steps_per_epoch, total, num_devices, config.batch_size,
    )

    encoder = models.build_encoder(config, axis_name=sharding.AXIS)
    tx, lr_schedule = optim.make_optimizer(config, steps_per_epoch)
    image_shape = (config.crop_size, config.crop_size, 3)
    state = state_lib.create_train_state(
        jax.random.key(config.seed), encoder, tx, image_shape, config.queue_size, config.embed_dim
    )
    knn_random = knn_fn(_encoder_variables(state))
    if workdir:
        state = checkpoint.restore_latest(workdir, state, config, num_devices) or state
    start_step = int(state.step)

    p_state = state_lib.to_devices(state)
    del state  # its buffers now live on the devices
    batches = prefetch_to_device(pretrain_batches(source, config, start_step))
    loop = TrainLoop(config, workdir, total, steps_per_epoch, lr_schedule, num_devices)
    p_state, history = loop.run(make_train_step(config, source.host_cropped), p_state, batches, start_step,
                                show_progress, knn_fn=lambda s: knn_fn(_encoder_variables(s)))

    state = state_lib.from_devices(p_state)
    knn_trained = knn_fn(_encoder_variables(state))
    final = {"step": int(state.step), **{f"knn_{k}": v for k, v in knn_trained.items()},
             **{f"knn_random_{k}": v for k, v in knn_random.items()}}
    if history:
        final.update({k: history[-1][k] for k in ("loss", "top1", "top5")})
    metrics.write_final(workdir, final)
    return {"knn_random": knn_random, "knn_trained": knn_trained, "history": history, "state": state}


class TrainLoop:
    """Steps, logging, the kNN monitor and checkpoints of one run."""

    def __init__(self, config, workdir, total_steps, steps_per_epoch, lr_schedule, num_devices):
        self.config, self.workdir, self.total_steps = config, workdir, total_steps
        self.steps_per_epoch, self.lr_schedule, self.num_devices = steps_per_epoch, lr_schedule, num_devices

    def run(self, p_train_step, p_state, batches, start_step, show_progress, knn_fn):
        """Steps start_step+1 .. total_steps; returns (p_state, logged history)."""
        config, last, spe = self.config, self.total_steps, self.steps_per_epoch
        log_every, knn_every = steps(config, "log_every", spe), steps(config, "knn_every", spe)
        checkpoint_every = steps(config, "checkpoint_every", spe)
        writer = metrics.MetricWriter(self.workdir)
        manager = checkpoint.make_manager(self.workdir, config.checkpoints_to_keep) if self.workdir else None
        history, pending = [], []
        last_time, last_step = time.perf_counter(), start_step
        try:
            for step in progress(range(start_step + 1, last + 1), last, show_progress and jax.process_index() == 0):
                p_state, step_metrics = p_train_step(p_state, next(batches))
                pending.append(step_metrics)
                if is_due(step, log_every, last):
                    summary = summarize(pending, step)
                    now = time.perf_counter()
                    summary.update(self._throughput(step - last_step, now - last_time), **self._schedule(step))
                    writer.write(step, summary)
                    history.append({"step": step, **summary})
                    pending, last_time, last_step = [], now, step
                if is_due(step, knn_every, last) and step != last:  # the last one: train_and_evaluate's
                    knn_result = knn_fn(state_lib.from_devices(p_state))
                    writer.write(step, {f"knn_{k}": v for k, v in knn_result.items()})
                    last_time = time.perf_counter()  # the monitor's time is not training time
                if manager and is_due(step, checkpoint_every, last):
                    assert_finite([(m["loss"], m["grad_norm"]) for m in pending], step)
                    checkpoint.save(manager, state_lib.from_devices(p_state), config, num_queue_shards=self.num_devices)
                    last_time = time.perf_counter()
        finally:
            if manager:
                manager.wait_until_finished()  # a good save in flight is completed, even on a NaN
                manager.close()
            writer.close()
        return p_state, history

    def _throughput(self, steps: int, seconds: float) -> dict[str, float]:
        images_per_sec = steps * self.config.batch_size / seconds
        return {
            "images_per_sec": images_per_sec,
            "images_per_sec_per_device": images_per_sec / self.num_devices,
            "step_time_ms": 1000 * seconds / steps,
        }

    def _schedule(self, step: int) -> dict[str, float]:
        return {
            "learning_rate": float(self.lr_schedule(step - 1)),
            "momentum": float(self.config.momentum),
            "epoch": step / self.steps_per_epoch,
        }
