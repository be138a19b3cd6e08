"""Start-up checks that turn a bad config into one clear error, not a
shape error deep inside a compiled step."""

from __future__ import annotations

from moco_jax.models import ARCHITECTURES


def validate_config(config, num_devices: int) -> None:
    """Raise ValueError naming the offending field(s).

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
    if config.shuffle_mode not in ("all_gather", "all_to_all"):
        raise ValueError(f"shuffle_mode={config.shuffle_mode!r} must be 'all_gather' or 'all_to_all'")
    if config.shuffle_mode == "all_to_all" and config.shuffle_bn and per_device % num_devices:
        raise ValueError(
            f"shuffle_mode='all_to_all' needs the per-device batch ({per_device}) to be a multiple of the "
            f"{num_devices} devices"
        )
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
