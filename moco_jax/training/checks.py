"""The start-up checks of a pretraining config: every field against the rule
its module declares, then the relations each module checks for itself. A
bad config stops the run before any data or model work, with one line that
names the field, its value and what it may be (not a shape error deep
inside a compiled step).

The fields are declared where they are read: `data.FIELDS` (the data
source), `optim` (the optimizer), `augment` (the views), `models` (the
encoder), `methods` (each method's own), `knn` (the monitor), `metrics`
(W&B), and `FIELDS` below (the loop's own).
"""

from __future__ import annotations

from typing import Sequence

from moco_jax import data, methods
from moco_jax.core import augment, models, optim
from moco_jax.core.config import RUN_FIELDS, check_batch_divides, check_fields, check_length, integer, interval_rules
from moco_jax.core.errors import ConfigError
from moco_jax.eval import knn
from moco_jax.training import metrics

INTERVALS = ("log_every", "checkpoint_every", "knn_every")
# The training loop's own fields.
FIELDS = {"train_subset": integer(0), "checkpoints_to_keep": integer(1), **interval_rules(*INTERVALS)}

# Every field of a pretraining config (configs/default.py) and what it may hold.
PRETRAINING_RULES = {**RUN_FIELDS, **data.FIELDS, **optim.FIELDS, **optim.PRETRAINING_FIELDS, **augment.FIELDS,
                     **models.FIELDS, **methods.FIELDS, **knn.FIELDS, **metrics.FIELDS, **FIELDS}


def validate_config(config, num_devices: int) -> None:
    """Raise ConfigError naming the offending field(s) of a pretraining config.

    Args:
      config: the experiment ConfigDict.
      num_devices: devices on the pmap axis (all processes together).
    """
    check_fields(config, PRETRAINING_RULES)  # types and ranges first: the relations below rely on them
    check_length(config, INTERVALS)
    metrics.check_wandb(config)
    check_batch_divides(config, num_devices)
    methods.get(config).check(config, num_devices)
    models.check(config)
    optim.check(config)
    data.check(config)  # last: it imports the dataset's source module (tensorflow-datasets for a TFDS name)


def resolve_for_devices(config, num_devices: int):
    """A copy of `config` with its automatic fields (bn_splits=0) set for
    `num_devices` devices; the config the run is built, validated and saved with."""
    resolved = config.copy_and_resolve_references()
    resolved.bn_splits = methods.get(config).bn_splits(config, num_devices)
    return resolved


def startup_warning(config, num_devices: int) -> str:
    """What about this config is weaker than its paper's recipe, naming the fix ('' if nothing)."""
    return methods.get(config).warning(config, num_devices)


def check_overrides(config, overridden: Sequence[str]) -> None:
    """Refuse, in one line, a field set on the command line that `config`'s
    encoder or method does not read (e.g. model.width on a ViT)."""
    problems = []
    for name in overridden:
        if name in models.ONLY_FOR:
            applies, kind, instead = models.ONLY_FOR[name]
            if not applies(config):
                problems.append(f"--config.{name} applies only to {kind} and would be ignored here ({instead})")
        reader = methods.reader_of(name)
        if reader is not None and reader is not methods.get(config):
            problems.append(f"--config.{name} applies only to {reader.TITLE} (method={reader.NAME!r}) and would be "
                            f"ignored here ({reader.ONLY_NOTE})")
    if problems:
        raise ConfigError("; ".join(problems))
