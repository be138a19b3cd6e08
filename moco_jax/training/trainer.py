"""The training loop: data in, pmap-ed MoCo steps, logging, kNN evaluation,
checkpoints; one run per workdir (io/lock.py), and a clean stop on SIGTERM
(training/preemption.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from moco_jax import data, methods
from moco_jax.core import augment, optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.core.config import steps, total_steps
from moco_jax.core.errors import ConfigError
from moco_jax.data.feed import prefetch_to_device
from moco_jax.eval import embed, knn
from moco_jax.io import checkpoint
from moco_jax.io import lock as workdir_lock
from moco_jax.io.saver import CheckpointWriter
from moco_jax.methods import online_probe
from moco_jax.methods.momentum import momentum_at
from moco_jax.training import checks, metrics, preemption
from moco_jax.training import loop as loop_lib


def step_hparams(config, total_steps: int = 0):
    """The static hyper-parameters of `config.method`'s step."""
    return methods.get(config).hparams(config, total_steps, sharding.AXIS)


def make_train_step(config, host_cropped: bool = False, total_steps: int = 0, num_classes: int = 0) -> Callable:
    """The pmap-ed step of `config.method`: (replicated state, uint8 batch)
    -> (state, metrics); `total_steps` ends the momentum schedule.

    The batch is (n, B_local, H, W, 3) whole images (cropped on the device),
    or (n, B_local, 2, S, S, 3) host crops when `host_cropped`, or the host's
    decoded images and boxes (slots, views) to cut and resize on the device
    (see `data.Source.train_batches`); with `config.online_probe` it is (images,
    int32 labels (n, B_local)) and the step also trains the probe on
    `num_classes` (`methods.online_probe`). The state's buffers are donated:
    updated in place."""
    views = augment.make_views_fn(augment.recipe_from_config(config), host_cropped)
    method, hp = methods.get(config), step_hparams(config, total_steps)
    if config.online_probe:
        moco_step = functools.partial(method.train_step, hp=dataclasses.replace(hp, return_features=True), views=views)
        step = online_probe.with_probe(moco_step, num_classes=num_classes, learning_rate=config.online_probe_lr,
                                       axis_name=sharding.AXIS)
    else:
        step = functools.partial(method.train_step, hp=hp, views=views)
    return jax.pmap(step, axis_name=sharding.AXIS, donate_argnums=(0,))


def with_online_probe(state: state_lib.MoCoState, config, encoder, num_classes: int) -> state_lib.MoCoState:
    """`state` with a fresh online probe when `config.online_probe` (its own
    key: the MoCo state is the same with the probe on or off)."""
    if not config.online_probe:
        return state
    rng = jax.random.fold_in(jax.random.key(config.seed), 0x0B1)
    return state.replace(probe=online_probe.init(rng, encoder.backbone.feature_dim, num_classes,
                                                 config.online_probe_lr))


def pretrain_batches(source: data.Source, config, start_step: int) -> Iterator:
    """This process's share of every global batch from `start_step` on (with
    their labels when `config.online_probe`)."""
    return source.train_batches(
        global_batch=config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_local_devices=jax.local_device_count(), crop_size=config.crop_size,
        crop_scale=tuple(config.crop_scale), labels=config.online_probe)


def knn_monitor(config, source: data.Source) -> embed.KnnMonitor:
    """variables -> weighted kNN accuracies of backbone and projection
    features: bank and queries streamed from `source` on every device of
    every process (`embed.knn_monitor`; compiles once)."""
    monitor = embed.knn_monitor(config, source)
    logging.info("kNN monitor: %s", monitor.describe())
    return monitor


# What the random-init kNN depends on besides the seed: a stored result is reused only while these are unchanged.
KNN_SETTINGS = ("seed", "method", "model", "embed_dim", "dataset", "data_dir", "train_split", "eval_split",
                "image_size", "crop_size", "augmentation", *knn.FIELDS)


def random_init_knn(workdir: str | None, config, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The kNN accuracies of the random init: measured once per run, at its
    first launch, and stored in the workdir (`metrics.KNN_RANDOM_NAME`); a
    relaunch reads them back rather than evaluating again (on ImageNet, a
    full pass over the kNN bank). Every process evaluates, or none does."""
    settings = {name: config[name].to_dict() if name == "model" else config[name] for name in KNN_SETTINGS}
    stored = metrics.read_knn_random(workdir, settings) if workdir else None
    if not sharding.any_process(stored is None):
        return stored
    accuracies = evaluate()
    metrics.write_knn_random(workdir, settings, accuracies)
    return accuracies


def _encoder_variables(state: state_lib.MoCoState) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def train_and_evaluate(config, workdir: str | None = None, show_progress: bool = True, *,
                       fresh_start: bool = False, take_over: bool = False) -> dict[str, Any]:
    """Pretrain MoCo with `config`, resuming from `workdir` if it holds a
    checkpoint; return the kNN accuracies and the log.

    The run holds the workdir's lock (`take_over`: also from a run that looks
    alive). `fresh_start` allows starting at step 0 in a workdir whose
    checkpoints are all unusable (see io/checkpoint.py). SIGTERM and SIGINT
    are handled from here to the end (training/preemption.py): during
    start-up they raise `preemption.Interrupted` (the lock released).

    Returns a dict with `knn_random` / `knn_trained` (backbone and projection
    accuracies before and after training), `history` (the metrics logged by
    this run), the final host `state`, `preempted` (the step after which a
    signal stopped the run, its checkpoint saved, else 0; then there is no
    `knn_trained`), `signal` (its number) and `phase` ("training", or "final
    evaluation" when it came after the last step).
    """
    num_devices = jax.device_count()
    checks.validate_config(config, num_devices)
    weaker = checks.startup_warning(config, num_devices)
    if weaker:
        logging.warning("%s", weaker)
    config = checks.resolve_for_devices(config, num_devices)
    with preemption.RunSignals(multi_process=jax.process_count() > 1) as signals, contextlib.ExitStack() as held:
        if workdir:
            checkpoint.check_writable(workdir)
        with signals.phase("start-up (taking the workdir's lock)", interruptible=False):  # never half-taken
            lock = held.enter_context(workdir_lock.holding(workdir, take_over))
        return _train(config, workdir, show_progress, fresh_start, lock, signals)


def _train(config, workdir, show_progress, fresh_start, lock, signals) -> dict[str, Any]:
    num_devices = jax.device_count()
    with signals.phase("start-up", interruptible=True):
        source = data.open_source(config, index_fallback=data.workdir_index(workdir))
        knn_fn = knn_monitor(config, source)  # un-augmented bank and queries, streamed
        knn_bank = source.num_labelled(config.knn_train_split, config.knn_max_train_images, config.seed)
        source = source.with_train_subset(config.train_subset, config.seed)
        steps_per_epoch = data.steps_per_epoch(source.num_train_examples, config.batch_size)
        total = total_steps(config, steps_per_epoch)
        if total <= 0:
            raise ConfigError(f"num_epochs={config.num_epochs} is less than half an epoch of {steps_per_epoch} "
                              "steps: no step to train; raise num_epochs or set num_train_steps")
        encoder = methods.build_encoder(config, axis_name=sharding.AXIS)
        tx, lr_schedule = optim.make_optimizer(config, steps_per_epoch)
        image_shape = (config.crop_size, config.crop_size, 3)
        num_classes = source.num_classes() if config.online_probe else 0
        state = state_lib.create_train_state(
            jax.random.key(config.seed), encoder, tx, image_shape, methods.get(config).queue_size(config),
            config.embed_dim)
        state = with_online_probe(state, config, encoder, num_classes)
        logging.info("%s", startup_line(config, state, source.num_train_examples, steps_per_epoch, total,
                                        num_devices))
        resumed = (checkpoint.resume(workdir, state, config, num_devices, fresh_start, source.loader)
                   if workdir else None)
        if resumed:
            warn_on_schedule_changes(resumed[1], config, source.num_train_examples, lr_schedule)
            finished = finished_run(workdir, int(resumed[0].step), total)
            if finished:
                return finished
        knn_random = random_init_knn(workdir, config, lambda: knn_fn(_encoder_variables(state)))  # after the restore
        state = resumed[0] if resumed else state
        start_step = int(state.step)
        p_state = state_lib.to_devices(state)
        del state  # its buffers now live on the devices
        host_batches = pretrain_batches(source, config, start_step)

    if not workdir:  # said once the start-up has succeeded, so that a start-up error stays the one line
        logging.warning("no --workdir: nothing will be saved (checkpoints, metrics, the trained encoder); to keep "
                        "the encoder, add --workdir DIR, e.g. --workdir runs/default")
    plan = pretraining_plan(config, total, steps_per_epoch)
    knn_each = lambda s: knn_fn(_encoder_variables(s))  # noqa: E731
    p_step = make_train_step(config, source.host_cropped, total, num_classes)
    task = Pretraining(config, p_step, knn_each, lr_schedule, plan, num_devices, source.loader,
                       source.num_train_examples, knn_bank)
    loop = loop_lib.Loop(task, plan, workdir, batch_size=config.batch_size, num_devices=num_devices, lock=lock,
                         config=config)
    try:
        with signals.phase("training", interruptible=False):
            p_state, history = loop.run(p_state, prefetch_to_device(host_batches), start_step, show_progress,
                                        signals=signals)
    finally:
        if hasattr(host_batches, "close"):
            host_batches.close()  # stops grain's worker processes now, not at exit

    state = state_lib.from_devices(p_state)
    stopped = {"knn_random": knn_random, "history": history, "state": state, "signal": signals.received,
               "knn_bank": knn_bank}
    if loop.preempted_at:
        return {**stopped, "preempted": loop.preempted_at, "phase": "training"}
    try:
        with signals.phase("final evaluation", interruptible=True):
            knn_trained = knn_fn(_encoder_variables(state))
    except preemption.Interrupted as e:
        if isinstance(e, preemption.Aborted):
            raise
        return {**stopped, "signal": e.signum, "preempted": int(state.step), "phase": "final evaluation"}
    final = {"step": int(state.step), "knn_bank": knn_bank, **{f"knn_{k}": v for k, v in knn_trained.items()},
             **{f"knn_random_{k}": v for k, v in knn_random.items()}}
    final.update(_last_training_metrics(history, workdir))
    metrics.write_final(workdir, final)
    return {"knn_random": knn_random, "knn_trained": knn_trained, "knn_bank": knn_bank, "history": history,
            "state": state, "preempted": 0, "signal": None, "phase": "", "step": int(state.step), "complete": False}


def startup_line(config, state: state_lib.MoCoState, num_train_examples: int, steps_per_epoch: int, total: int,
                 num_devices: int) -> str:
    """What is trained, on what, how long: the run's first log line."""
    params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
    method = methods.get(config)
    bn = (f"BN groups: {num_devices} devices x {config.bn_splits} splits of "
          f"{config.batch_size // num_devices // config.bn_splits} images")
    return (f"{method.TITLE} ({method.negatives(config)}): {methods.describe(config)}, {params:,} trainable "
            f"parameters in the query encoder; {config.dataset}: {num_train_examples} train images, "
            f"{steps_per_epoch} steps/epoch, {total} steps, global batch {config.batch_size} on {num_devices} "
            f"devices, {bn}")


def finished_run(workdir: str, step: int, total: int) -> dict[str, Any] | None:
    """A relaunch of a run that is complete (its last checkpoint is the last
    step and its final metrics were written): the stored result, reported
    in one line, with nothing trained, evaluated or written; else None."""
    final = metrics.read_final(workdir) if step >= total else None
    if not final or final.get("step") != step:
        return None
    logging.info("%s is complete (step %d of %d, %s written): nothing to train; the stored result follows", workdir,
                 step, total, metrics.FINAL_NAME)
    knn = {kind: {name: final[f"{key}_{name}"] for name in ("backbone", "projection") if f"{key}_{name}" in final}
           for kind, key in (("knn_random", "knn_random"), ("knn_trained", "knn"))}
    return {**knn, "knn_bank": final.get("knn_bank"), "history": [], "state": None, "preempted": 0, "signal": None,
            "phase": "", "step": step,
            "complete": True}


def warn_on_schedule_changes(meta: dict, config, num_train_examples: int, lr_schedule) -> None:
    """Warn when the resumed run's schedule differs from the one that wrote
    checkpoint `meta["step"]`: another number of training images (the epoch
    length changes), or another learning rate at the resume step (a longer
    `num_train_steps` / `num_epochs` stretches the decay)."""
    step, saved_examples = meta["step"], meta.get("num_train_examples")
    if saved_examples and saved_examples != num_train_examples:
        logging.warning(
            "checkpoint %d was written with %d training images and there are %d now: an epoch is now %d steps "
            "(was %d), so the epoch-based schedule, logging and checkpoints shift from here on", step,
            saved_examples, num_train_examples, data.steps_per_epoch(num_train_examples, config.batch_size),
            data.steps_per_epoch(saved_examples, meta["config"]["batch_size"]))
    before, now = meta.get("learning_rate"), float(lr_schedule(step))
    if before is not None and not np.isclose(before, now, rtol=1e-5, atol=0.0):
        logging.warning(
            "the learning rate of step %d, the first after checkpoint %d, changes from %.6g (the schedule of the "
            "run that wrote it) to %.6g (this config's)", step + 1, step, before, now)


def _last_training_metrics(history: list[dict], workdir: str | None) -> dict[str, float]:
    """Loss and accuracies of the last logged step: of this run, or (a
    relaunch with nothing left to train) of the run that trained it."""
    records = history
    if not records and workdir and jax.process_index() == 0:
        try:
            records = metrics.read_jsonl(workdir)
        except FileNotFoundError:
            records = []
    for record in reversed(records):
        if "loss" in record:
            return {k: record[k] for k in ("loss", "top1", "top5") if k in record}
    return {}


class Pretraining:
    """MoCo pretraining as a `loop.Task`: the method's pmap-ed step; the
    learning rate, momentum and epoch logged with each step's metrics; the
    weight norms and the kNN monitor at `knn_every`; checkpoints with what a
    resume checks (queue shards, pipeline, images, learning rate)."""

    GUARDED = ("loss", "grad_norm")

    def __init__(self, config, p_step, knn_fn, lr_schedule, plan: loop_lib.Plan, num_devices: int,
                 pipeline: str = "", num_train_examples: int = 0, knn_bank: int = 0):
        self.config, self.p_step, self.knn_fn, self.lr_schedule = config, p_step, knn_fn, lr_schedule
        self.knn_bank = knn_bank  # the kNN bank's images, logged with its accuracies
        self.plan, self.num_devices = plan, num_devices
        self.pipeline = pipeline  # what reads the images (`Source.loader`), saved with each checkpoint
        self.num_train_examples = num_train_examples  # saved too: a resume warns when it changed

    def step(self, p_state, batch):
        return self.p_step(p_state, batch)

    def schedule(self, step: int) -> dict[str, float]:
        config = self.config
        return {
            "learning_rate": float(self.lr_schedule(step - 1)),
            "momentum": float(momentum_at(step - 1, config.momentum, config.momentum_schedule,
                                          self.plan.total_steps)),
            "epoch": step / self.plan.steps_per_epoch,
        }

    def first(self, p_state) -> dict[str, float]:
        return metrics.weight_norms(state_lib.from_devices(p_state).params)

    def monitor(self, p_state, step: int, last: bool) -> dict[str, float]:
        host_state = state_lib.from_devices(p_state)
        monitored = metrics.weight_norms(host_state.params)
        if not last:  # the last kNN is train_and_evaluate's
            monitored.update({f"knn_{k}": v for k, v in self.knn_fn(host_state).items()}, knn_bank=self.knn_bank)
        return monitored

    def save(self, saver: CheckpointWriter, p_state, step: int) -> None:
        saver.save(state_lib.from_devices(p_state), self.config, num_queue_shards=self.num_devices,
                   data_pipeline=self.pipeline, num_train_examples=self.num_train_examples,
                   learning_rate=float(self.lr_schedule(step)))


def pretraining_plan(config, total: int, steps_per_epoch: int) -> loop_lib.Plan:
    """When pretraining logs, evaluates and saves, in steps."""
    return loop_lib.Plan(total, steps_per_epoch, steps(config, "log_every", steps_per_epoch),
                         steps(config, "checkpoint_every", steps_per_epoch),
                         steps(config, "knn_every", steps_per_epoch), config.checkpoints_to_keep)
