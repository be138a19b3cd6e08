"""The linear probe (`moco_jax.eval.linear`) run through the training loop,
so that it has everything pretraining has: the workdir's lock, a clean stop
with the step saved on SIGTERM / SIGINT, the NaN guard, metrics.jsonl /
TensorBoard / W&B, the progress bar, and resumption from its checkpoints.

    result = probe.evaluate(config, workdir, encoder)     # {"top1", "top5", "step", ...}

Every step runs on all devices of all processes, each process reading only
its share of the images (`data.Source.labelled_train_batches`,
`eval_batches`): nothing dataset-sized is held in host memory. Two kinds of
input feed the same loop:

* `FullInputs` (`mode=full`, the reference protocol): images, augmented and
  embedded by the frozen backbone at every step.
* `FeatureInputs` (`mode=features`): the features of every image, extracted
  once on all devices and cached in `<workdir>/features/<split>`
  (`eval.feature_cache`, per-process shards read back memory-mapped), reused
  by a relaunch; the classifier trains on batches of rows of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging

from moco_jax import data
from moco_jax.core import optim, sharding
from moco_jax.core.config import steps, total_steps
from moco_jax.core.errors import ConfigError
from moco_jax.data.feed import prefetch_to_device
from moco_jax.data.source import local_batch_indices, num_eval_steps
from moco_jax.eval import feature_cache, linear
from moco_jax.eval.embed import Encoder, load
from moco_jax.io import checkpoint, digests
from moco_jax.io import lock as workdir_lock
from moco_jax.io.saver import CheckpointWriter
from moco_jax.training import loop as loop_lib
from moco_jax.training import preemption

FEATURES_DIR = "features"  # in the workdir: the cached features of features mode, one folder per split


class Probe:
    """The linear probe as a `loop.Task`: a classifier step, its learning
    rate and epoch logged, the classifier state checkpointed."""

    GUARDED = ("loss",)

    def __init__(self, config, step_fn, lr_schedule, plan: loop_lib.Plan):
        self.config, self.step_fn, self.lr_schedule, self.plan = config, step_fn, lr_schedule, plan

    def step(self, p_state, batch):
        return self.step_fn(p_state, *batch)

    def schedule(self, step: int) -> dict[str, float]:
        return {"learning_rate": float(self.lr_schedule(step - 1)), "epoch": step / self.plan.steps_per_epoch}

    def first(self, p_state) -> dict[str, float]:
        return {}

    def monitor(self, p_state, step: int, last: bool) -> dict[str, float]:
        return {}

    def save(self, saver: CheckpointWriter, p_state, step: int) -> None:
        saver.save(sharding.unreplicate(p_state), self.config)


def eval_batch_size(config) -> int:
    """`config.eval_batch_size` rounded up to a multiple of all the devices."""
    n = jax.device_count()
    return -(-config.eval_batch_size // n) * n


def _stream(source: data.Source, config, split: str, max_images: int = 0) -> Iterator:
    """This process's share of each evaluation step of `split`: (uint8 images
    (n, b, ...), int32 labels (n, b), bool valid (n, b))."""
    return source.eval_batches(split=split, size=config.crop_size, crop_fraction=config.eval_crop_fraction,
                               global_batch=eval_batch_size(config), process_index=jax.process_index(),
                               process_count=jax.process_count(), num_local_devices=jax.local_device_count(),
                               max_images=max_images, seed=config.seed)


class FullInputs:
    """mode=full: augmented images through the frozen backbone at every step."""

    def __init__(self, config, encoder: Encoder, source: data.Source):
        self.config, self.source = config, source
        self.num_train = source.num_labelled(config.train_split, config.max_train_images, config.seed)
        mean, std, backbone = encoder.mean, encoder.std, encoder.backbone
        recipe = linear.train_recipe(config.crop_size, config.train_crop_scale, mean, std)
        self.p_backbone = sharding.replicate(encoder.backbone_variables)
        self._p_step = linear.make_full_train_step(backbone, recipe, config.seed, source.host_cropped)
        self._p_counts = linear.make_full_counts_fn(
            backbone, linear.make_classifier(source.num_classes()).apply, config.crop_size,
            config.eval_crop_fraction, mean, std, source.host_cropped)

    def step(self, p_state, images, labels):
        return self._p_step(p_state, self.p_backbone, images, labels)

    def train_batches(self, start_step: int) -> Iterator:
        config = self.config
        return self.source.labelled_train_batches(
            global_batch=config.batch_size, seed=config.seed, crop_size=config.crop_size,
            crop_scale=tuple(config.train_crop_scale), start_step=start_step, process_index=jax.process_index(),
            process_count=jax.process_count(), num_local_devices=jax.local_device_count(),
            split=config.train_split, max_images=config.max_train_images)

    def evaluate(self, p_params) -> np.ndarray:
        """(top-1 hits, top-5 hits, images) on the eval split, over all processes."""
        total = 0.0
        for batch in _stream(self.source, self.config, self.config.eval_split):
            total = total + self._p_counts(p_params, self.p_backbone, *sharding.shard(batch))
        return np.asarray(sharding.unreplicate(total))


class FeatureInputs:
    """mode=features: batches of rows of the cached features."""

    def __init__(self, config, encoder: Encoder, source: data.Source, folder: str):
        self.config = config
        p_features = linear.make_features_fn(encoder.backbone, config.crop_size, config.eval_crop_fraction,
                                             encoder.mean, encoder.std, source.host_cropped)
        p_backbone = sharding.replicate(encoder.backbone_variables)
        encoder_digest = digests.meta_digest(digests.array_digests(encoder.backbone_variables))

        def split_features(split: str, max_images: int) -> feature_cache.FeatureShards:
            num = source.num_labelled(split, max_images, config.seed)
            layout = feature_cache.Layout(num, eval_batch_size(config), jax.process_count(),
                                          num_eval_steps(num, eval_batch_size(config)))
            settings = {"encoder": encoder_digest, "dataset": config.dataset, "data_dir": config.data_dir,
                        "image_size": config.image_size, "split": split, "max_images": max_images,
                        "seed": config.seed if max_images else 0, "crop_size": config.crop_size,
                        "eval_crop_fraction": config.eval_crop_fraction}
            extract = lambda: ((sharding.local_rows(p_features(p_backbone, sharding.shard(images))),  # noqa: E731
                                labels.reshape(-1), valid.reshape(-1))
                               for images, labels, valid in _stream(source, config, split, max_images))
            return feature_cache.cached(os.path.join(folder, split or "train"), settings, layout, extract)

        self.train = split_features(config.train_split, config.max_train_images)
        self.test = split_features(config.eval_split, 0)
        self.positions = self.train.valid_positions()
        self.num_train = len(self.positions)
        self._p_step = linear.make_features_train_step()
        self._p_counts = linear.make_features_counts_fn(linear.make_classifier(source.num_classes()).apply)

    def step(self, p_state, features, labels):
        return self._p_step(p_state, features, labels)

    def train_batches(self, start_step: int) -> Iterator:
        n, config = jax.local_device_count(), self.config
        for idx in local_batch_indices(self.num_train, config.batch_size, config.seed, start_step,
                                       jax.process_index(), jax.process_count(), n):
            features, labels = self.train.rows(self.positions[idx])
            yield features.reshape(n, -1, features.shape[-1]), labels.reshape(n, -1)

    def evaluate(self, p_params) -> np.ndarray:
        """(top-1 hits, top-5 hits, images) on the eval split, over all processes."""
        features, labels, valid = self.test.own(jax.process_index())
        n, step = jax.local_device_count(), self.test.layout.local
        total = 0.0
        for start in range(0, len(labels), step):
            rows = slice(start, start + step)
            batch = (np.asarray(features[rows]).reshape(n, -1, features.shape[-1]),
                     np.asarray(labels[rows]).reshape(n, -1), np.asarray(valid[rows]).reshape(n, -1))
            total = total + self._p_counts(p_params, *sharding.shard(batch))
        return np.asarray(sharding.unreplicate(total))


def evaluate(config, workdir: str | None = None, encoder: Encoder | None = None, *, fresh_start: bool = False,
             take_over: bool = False, show_progress: bool = False) -> dict[str, Any]:
    """Linear evaluation of `config.pretrained` (or of `encoder` if given) in
    `config.mode`, holding `workdir`'s lock and resuming from its
    checkpoints (`fresh_start`: start over where none is usable). SIGTERM
    and SIGINT save the step and stop (training/preemption.py).

    Returns top1, top5 (eval split, in [0, 1]), the last `step`, the logged
    `history`, the host `state`, and `preempted` (the step a signal stopped
    the probe after, 0 if none; then there are no accuracies), `signal`, `phase`.
    """
    linear.validate_linear_config(config, jax.device_count())
    if encoder is None:
        if not config.pretrained:
            raise ConfigError("pretrained is not set: pass --pretrained=<a pretraining workdir or an exported "
                              "encoder> (see moco_jax.pretrained.load)")
        encoder = load(config.pretrained)
    config = linear.resolve_config(config, encoder)
    with preemption.RunSignals(multi_process=jax.process_count() > 1) as signals, contextlib.ExitStack() as held:
        if workdir:
            checkpoint.check_writable(workdir)
        with signals.phase("start-up (taking the workdir's lock)", interruptible=False):
            lock = held.enter_context(workdir_lock.holding(workdir, take_over))
        folder = os.path.join(workdir, FEATURES_DIR) if workdir else held.enter_context(_scratch())
        return _probe(config, encoder, workdir, folder, fresh_start, lock, signals, show_progress)


@contextlib.contextmanager
def _scratch():
    """A folder for the features of a probe without a workdir, removed after."""
    folder = tempfile.mkdtemp(prefix="moco_jax_features_")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def probe_plan(config, total: int, steps_per_epoch: int) -> loop_lib.Plan:
    return loop_lib.Plan(total, steps_per_epoch, steps(config, "log_every", steps_per_epoch),
                         steps(config, "checkpoint_every", steps_per_epoch))


def _probe(config, encoder, workdir, folder, fresh_start, lock, signals, show_progress) -> dict[str, Any]:
    with signals.phase("start-up", interruptible=True):
        source = data.open_source(config, index_fallback=data.workdir_index(workdir))
        inputs = (FullInputs(config, encoder, source) if config.mode == "full"
                  else FeatureInputs(config, encoder, source, folder))
        spe = data.steps_per_epoch(inputs.num_train, config.batch_size)
        total = total_steps(config, spe)
        state = linear.create_state(config, encoder.feature_dim, source.num_classes(), spe)
        restored = (checkpoint.restore_newest(workdir, state, config, linear.CHECKPOINT_FIELDS, fresh_start)
                    if workdir else None)
        state = restored[0] if restored else state
        start = int(state.step)
        p_state = sharding.replicate(state)
        del state
    plan = probe_plan(config, total, spe)
    _, lr_schedule = optim.sgd_optimizer(config, spe)
    loop = loop_lib.Loop(Probe(config, inputs.step, lr_schedule, plan), plan, workdir, batch_size=config.batch_size,
                         num_devices=jax.device_count(), lock=lock, config=config)
    history = []
    if start >= total:
        logging.info("linear probe in %s: checkpoint %d is the last step (of %d): nothing to train, only the final "
                     "evaluation runs", workdir, start, total)
    else:
        batches = inputs.train_batches(start)
        try:
            with signals.phase("training", interruptible=False):
                p_state, history = loop.run(p_state, prefetch_to_device(batches), start, show_progress, signals)
        finally:
            if hasattr(batches, "close"):
                batches.close()  # stops grain's worker processes now, not at exit
    stopped = {"history": history, "state": sharding.unreplicate(p_state), "signal": signals.received}
    if loop.preempted_at:
        return {**stopped, "preempted": loop.preempted_at, "phase": "training", "step": loop.preempted_at}
    try:
        with signals.phase("final evaluation", interruptible=True):
            result = linear.accuracies(inputs.evaluate(p_state.params))
    except preemption.Interrupted as e:
        if isinstance(e, preemption.Aborted):
            raise
        step = int(stopped["state"].step)
        return {**stopped, "signal": e.signum, "preempted": step, "phase": "final evaluation", "step": step}
    return {**result, **stopped, "step": int(stopped["state"].step), "preempted": 0, "phase": ""}
