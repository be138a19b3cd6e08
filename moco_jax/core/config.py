"""Helpers every program shares for its ml_collections config: durations in
epochs or steps, fields by their command-line names, and the start-up checks
of a pretraining config (one clear error, not a shape error deep inside a
compiled step).

Durations. A recipe says "every 10 epochs" or "every 500 steps"; which one it
means matters when the batch size changes. So an interval `X` is two fields,
`X_steps` and `X_epochs` (0 = unset), and `steps(config, "X", spe)` is the
one place that turns it into optimizer steps, as big_vision's `steps()` does.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util

from moco_jax.core import moco
from moco_jax.core.models import ARCHITECTURES


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """A duration in epochs as optimizer steps (rounded)."""
    return int(round(epochs * steps_per_epoch))


def steps(config, name: str, steps_per_epoch: int) -> int:
    """`config.<name>_steps` or `config.<name>_epochs` as steps; 0 if neither is set.

    Both fields must be declared; setting both (> 0) is an error, since the
    two would disagree as soon as the batch size changes. A positive number
    of epochs is at least one step.
    """
    n_steps, n_epochs = config[f"{name}_steps"], config[f"{name}_epochs"]
    if n_steps > 0 and n_epochs > 0:
        raise ValueError(
            f"{name}_steps={n_steps} and {name}_epochs={n_epochs} are both set; set one of them (the other to 0)"
        )
    if n_steps > 0:
        return int(n_steps)
    if n_epochs > 0:
        return max(1, epochs_to_steps(n_epochs, steps_per_epoch))
    return 0


def is_due(step: int, interval: int, last: int) -> bool:
    """Whether a periodic action (log, checkpoint, evaluation) runs after
    `step`: every `interval` steps (0 = never) and after the last one."""
    return step == last or (interval > 0 and step % interval == 0)


def total_steps(config, steps_per_epoch: int) -> int:
    """The length of a run: `config.num_train_steps` when positive, else
    `num_epochs` of data."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return epochs_to_steps(config.num_epochs, steps_per_epoch)


def flatten_dotted(tree: dict) -> dict[str, Any]:
    """{"model": {"depth": 50}} -> {"model.depth": 50}: config fields by their
    command-line names."""
    return traverse_util.flatten_dict(tree, sep=".")


def validate_config(config, num_devices: int) -> None:
    """Raise ValueError naming the offending field(s) of a pretraining config.

    Args:
      config: the experiment ConfigDict.
      num_devices: devices on the pmap axis (all processes together).
    """
    batch, queue, splits = config.batch_size, config.queue_size, config.bn_splits
    if batch <= 0 or batch % num_devices:
        raise ValueError(f"batch_size={batch} must be a positive multiple of the device count ({num_devices})")
    if queue <= 0 or queue % batch:
        raise ValueError(
            f"queue_size={queue} must be a positive multiple of batch_size={batch}: the queue is "
            "overwritten one whole global batch at a time"
        )
    per_device = batch // num_devices
    if splits <= 0 or per_device % splits:
        raise ValueError(
            f"bn_splits={splits} must divide the per-device batch (batch_size={batch} / "
            f"{num_devices} devices = {per_device})"
        )
    moco.check_shuffle_mode(config.shuffle_mode, per_device if config.shuffle_bn else None, num_devices)
    if per_device // splits < 2:
        raise ValueError(
            f"bn_splits={splits} leaves {per_device // splits} image per BN group (batch_size={batch} / "
            f"{num_devices} devices / {splits} splits); BN needs at least 2: lower bn_splits "
            "(on n devices, bn_splits=1 already gives shuffle BN over n groups)"
        )
    if config.symmetric_loss and queue % (2 * batch):
        raise ValueError(
            f"queue_size={queue} must be a multiple of 2 * batch_size={2 * batch} with symmetric_loss: "
            "both views' keys enter the queue every step"
        )
    if not config.temperature > 0:
        raise ValueError(f"temperature={config.temperature} must be positive")
    if not 0.0 <= config.momentum <= 1.0:
        raise ValueError(f"momentum={config.momentum} (key-encoder EMA) must lie in [0, 1]")
    if config.model.depth not in ARCHITECTURES:
        raise ValueError(f"model.depth={config.model.depth} must be one of {sorted(ARCHITECTURES)}")
    if config.embed_dim <= 0:
        raise ValueError(f"embed_dim={config.embed_dim} must be positive")
    for interval in ("log_every", "checkpoint_every", "knn_every"):
        steps(config, interval, 1)  # refuses an interval given in both steps and epochs
