"""The training loop: data in, pmap-ed MoCo steps, logging, kNN evaluation,
checkpoints; one run per workdir (io/lock.py), and a clean stop on SIGTERM
(training/preemption.py)."""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from moco_jax import data, methods
from moco_jax.core import augment, optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.core.config import is_due, steps, total_steps
from moco_jax.core.errors import ConfigError, DivergedError, WorkdirError
from moco_jax.data.feed import prefetch_to_device
from moco_jax.eval import embed, knn
from moco_jax.io import checkpoint
from moco_jax.io import lock as workdir_lock
from moco_jax.io.saver import CheckpointWriter
from moco_jax.io.storage import StorageError
from moco_jax.methods.momentum import momentum_at
from moco_jax.training import checks, console, metrics, preemption


def step_hparams(config, total_steps: int = 0):
    """The static hyper-parameters of `config.method`'s step."""
    return methods.get(config).hparams(config, total_steps, sharding.AXIS)


def make_train_step(config, host_cropped: bool = False, total_steps: int = 0) -> Callable:
    """The pmap-ed step of `config.method`: (replicated state, uint8 batch)
    -> (state, metrics); `total_steps` ends the momentum schedule.

    The batch is (n, B_local, H, W, 3) whole images (cropped on the device),
    or (n, B_local, 2, S, S, 3) host crops when `host_cropped` (see
    `data.Source.train_batches`). The state's buffers are donated: updated in place."""
    views = augment.make_views_fn(augment.recipe_from_config(config), host_cropped)
    step = functools.partial(methods.get(config).train_step, hp=step_hparams(config, total_steps), views=views)
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


def summarize(pending: list[dict[str, jax.Array]], step: int, resumed_from: int = 0) -> dict[str, float]:
    """Mean of the metrics of the steps since the last log. Within the
    training steps, this and `assert_finite` are the only places the host
    waits for the devices (the kNN monitor and checkpoints wait too)."""
    stacked = jax.device_get(pending)
    summary = {k: float(np.mean([np.asarray(m[k])[0] for m in stacked])) for k in stacked[0]}
    assert_finite([summary["loss"], summary["grad_norm"]], step, resumed_from)
    return summary


def assert_finite(values, step: int, resumed_from: int = 0) -> None:
    """The NaN guard on losses and gradient norms: stop before a non-finite
    state can be logged as fine or saved over the last good checkpoint."""
    values = np.asarray(jax.device_get(values), np.float64)
    if not np.all(np.isfinite(values)):
        # Restored checkpoints are verified against their checksums, so a
        # resumed state is the one that was saved: the cause is the recipe.
        resumed = f" (this run resumed from verified checkpoint {resumed_from})" if resumed_from else ""
        raise DivergedError(
            f"non-finite loss or gradient at or before step {step}{resumed}; training stopped and the last good "
            "checkpoint (if any) is kept: lower the learning rate or check the data before relaunching"
        )


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
        source = data.open_source(config)
        knn_fn = knn_monitor(config, knn.monitor_dataset(source, config))  # un-augmented bank and queries
        source = source.with_train_subset(config.train_subset, config.seed)
        steps_per_epoch = data.steps_per_epoch(source.num_train_examples, config.batch_size)
        total = total_steps(config, steps_per_epoch)
        if total <= 0:
            raise ConfigError(f"num_epochs={config.num_epochs} is less than half an epoch of {steps_per_epoch} "
                              "steps: no step to train; raise num_epochs or set num_train_steps")
        encoder = methods.build_encoder(config, axis_name=sharding.AXIS)
        tx, lr_schedule = optim.make_optimizer(config, steps_per_epoch)
        image_shape = (config.crop_size, config.crop_size, 3)
        state = state_lib.create_train_state(
            jax.random.key(config.seed), encoder, tx, image_shape, methods.get(config).queue_size(config),
            config.embed_dim)
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
    loop = TrainLoop(config, workdir, total, steps_per_epoch, lr_schedule, num_devices, lock, source.loader,
                     source.num_train_examples)
    try:
        with signals.phase("training", interruptible=False):
            p_state, history = loop.run(make_train_step(config, source.host_cropped, total), p_state,
                                        prefetch_to_device(host_batches), start_step, show_progress,
                                        knn_fn=lambda s: knn_fn(_encoder_variables(s)), signals=signals)
    finally:
        if hasattr(host_batches, "close"):
            host_batches.close()  # stops grain's worker processes now, not at exit

    state = state_lib.from_devices(p_state)
    stopped = {"knn_random": knn_random, "history": history, "state": state, "signal": signals.received}
    if loop.preempted_at:
        return {**stopped, "preempted": loop.preempted_at, "phase": "training"}
    try:
        with signals.phase("final evaluation", interruptible=True):
            knn_trained = knn_fn(_encoder_variables(state))
    except preemption.Interrupted as e:
        if isinstance(e, preemption.Aborted):
            raise
        return {**stopped, "signal": e.signum, "preempted": int(state.step), "phase": "final evaluation"}
    final = {"step": int(state.step), **{f"knn_{k}": v for k, v in knn_trained.items()},
             **{f"knn_random_{k}": v for k, v in knn_random.items()}}
    final.update(_last_training_metrics(history, workdir))
    metrics.write_final(workdir, final)
    return {"knn_random": knn_random, "knn_trained": knn_trained, "history": history, "state": state,
            "preempted": 0, "signal": None, "phase": "", "step": int(state.step), "complete": False}


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
    return {**knn, "history": [], "state": None, "preempted": 0, "signal": None, "phase": "", "step": step,
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


class _Eta:
    """The time left, from the steps run since the first one (which
    compiles, and so is left out of the rate)."""

    def __init__(self, last: int):
        self.last, self.first, self.start = last, None, 0.0

    def stepped(self, step: int) -> None:
        if self.first is None:
            self.first, self.start = step, time.perf_counter()

    def left(self, step: int) -> str:
        """'(eta 0:31)', or '' before a rate is known or after the last step."""
        if self.first is None or step <= self.first or step >= self.last:
            return ""
        rate = (time.perf_counter() - self.start) / (step - self.first)
        return f"(eta {console.eta(rate * (self.last - step))})"


class TrainLoop:
    """Steps, logging, the kNN monitor and checkpoints of one run."""

    def __init__(self, config, workdir, total_steps, steps_per_epoch, lr_schedule, num_devices, lock=None,
                 pipeline="", num_train_examples=0):
        self.config, self.workdir, self.total_steps = config, workdir, total_steps
        self.steps_per_epoch, self.lr_schedule, self.num_devices = steps_per_epoch, lr_schedule, num_devices
        self.lock = lock  # process 0's WorkdirLock (None elsewhere, and without a workdir)
        self.pipeline = pipeline  # what reads the images (`Source.loader`), saved with each checkpoint
        self.num_train_examples = num_train_examples  # saved too: a resume warns when it changed
        self.preempted_at = 0  # the step a signal stopped the run at (after saving it)

    def run(self, p_train_step, p_state, batches, start_step, show_progress, knn_fn, signals=None):
        """Steps start_step+1 .. total_steps, or until a signal; returns (p_state, logged history)."""
        config, last, spe = self.config, self.total_steps, self.steps_per_epoch
        signals = signals or preemption.RunSignals(jax.process_count() > 1)
        log_every, knn_every = steps(config, "log_every", spe), steps(config, "knn_every", spe)
        checkpoint_every = steps(config, "checkpoint_every", spe)
        writer = metrics.MetricWriter(self.workdir, config)
        saver = CheckpointWriter(self.workdir, config.checkpoints_to_keep) if self.workdir else None
        history, pending = [], []
        if start_step == 0:
            writer.write(0, metrics.weight_norms(state_lib.from_devices(p_state).params))
        last_time, last_step = time.perf_counter(), start_step
        timer = _Eta(last)
        try:
            for step in console.progress(range(start_step + 1, last + 1), last,
                                         show_progress and jax.process_index() == 0):
                p_state, step_metrics = p_train_step(p_state, next(batches))
                pending.append(step_metrics)
                timer.stepped(step)
                logged = is_due(step, log_every, last)
                if logged:
                    summary = summarize(pending, step, start_step)
                    now = time.perf_counter()
                    summary.update(self._throughput(step - last_step, now - last_time), **self._schedule(step))
                    writer.write(step, summary, progress=f"/{last} {timer.left(step)}".rstrip())
                    history.append({"step": step, **summary})
                    pending, last_time, last_step = [], now, step
                if is_due(step, knn_every, last):
                    host_state = state_lib.from_devices(p_state)
                    monitored = metrics.weight_norms(host_state.params)
                    if step != last:  # the last kNN is train_and_evaluate's
                        monitored.update({f"knn_{k}": v for k, v in knn_fn(host_state).items()})
                    writer.write(step, monitored)
                    last_time = time.perf_counter()  # the monitor's time is not training time
                stop = self._should_stop(step, signals, agree=logged)
                save = saver is not None and (is_due(step, checkpoint_every, last) or stop)
                self._check_health(saver, agree=logged or save)
                if save:
                    assert_finite([(m["loss"], m["grad_norm"]) for m in pending], step, start_step)
                    saver.save(state_lib.from_devices(p_state), config, num_queue_shards=self.num_devices,
                               data_pipeline=self.pipeline, num_train_examples=self.num_train_examples,
                               learning_rate=float(self.lr_schedule(step)))
                    last_time = time.perf_counter()
                if stop:
                    self.preempted_at = step
                    logging.warning("%s at step %d: %s", signals.signal_name, step,
                                    f"saving checkpoint {step}" if saver else "no --workdir, nothing saved")
                    break
        finally:
            try:
                if saver:
                    saver.finish()  # a good save in flight is completed and checked, even on an error
            finally:
                writer.close()
        return p_state, history

    def _should_stop(self, step: int, signals: preemption.RunSignals, agree: bool) -> bool:
        """Whether a signal stops the run after `step`, on every process
        alike: SIGTERM through JAX's preemption sync point (every step), a
        SIGINT of any process at log and checkpoint steps."""
        if signals.should_stop(step):
            return True
        if jax.process_count() == 1 or not agree:
            return False
        (interrupted,) = sharding.any_process_each([signals.received == signal.SIGINT])
        if interrupted and signals.received is None:
            signals.received = signal.SIGINT
        return interrupted

    def _check_health(self, saver: CheckpointWriter | None, agree: bool) -> None:
        """Stop if another launch took the workdir over (without saving) or
        the last checkpoint failed to save or read back. One process: after
        every step (the lock is re-read at log and checkpoint steps); several:
        at log and checkpoint steps, where they agree."""
        if not self.workdir:
            return
        failure = saver.poll() if saver is not None else None
        lost = self.lock is not None and (self.lock.lost or (agree and not self.lock.still_held()))
        if jax.process_count() > 1:
            if not agree:
                return
            lost, failed = sharding.any_process_each([lost, failure is not None])
            if failed:
                failure = StorageError(workdir_lock.broadcast_message(str(failure or ""))
                                       or "a checkpoint failed to save on another process; training stopped")
        if lost:
            holder = getattr(self.lock, "lost_to", None)
            by = f" ({holder.describe()})" if holder is not None else ""
            raise WorkdirError(f"another launch{by} took over workdir {self.workdir} (--take_over); this run "
                               "stopped without saving so as not to write over its checkpoints")
        if failure is not None:
            raise failure

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
            "momentum": float(momentum_at(step - 1, self.config.momentum, self.config.momentum_schedule,
                                          self.total_steps)),
            "epoch": step / self.steps_per_epoch,
        }
