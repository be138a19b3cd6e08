"""What the rest of moco_jax asks of a method (`Method`), and the config
fields and checks every method shares.

A method is one module of this package (`moco_v2.py`, `moco_v3.py`) with the
attributes of `Method`; `methods/__init__.py` maps `config.method` to it. The
trainer, the checkpoints, export and evaluation go through that interface
and never ask which method they run.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import flax.linen as nn
import jax

from moco_jax.core.config import BOOL, POSITIVE, Rule, integer, number, one_of
from moco_jax.core.errors import ConfigError
from moco_jax.methods.momentum import MOMENTUM_SCHEDULES

# The on-device augmentation a step is given: (rng, batch) -> two views,
# each (B_local, H, W, 3).
Views = Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]]


@runtime_checkable
class Method(Protocol):
    """One MoCo method, as a module.

    NAME: its `config.method`; TITLE: its name in words ("MoCo v3").
    FIELDS: the config fields only it reads, and what each may hold (one
      set on the command line for another method is refused).
    ONLY_NOTE: why those fields mean nothing to the other methods (the end of
      the one-line error for overriding one of them under another method).
    SHAPE_FIELDS: its fields that fix the saved arrays' shapes (a checkpoint
      written with other values cannot be resumed).
    """

    NAME: str
    TITLE: str
    FIELDS: Mapping[str, Rule]
    ONLY_NOTE: str
    SHAPE_FIELDS: tuple[str, ...]

    def check(self, config, num_devices: int) -> None:
        """Raise ConfigError for a config this method cannot train on
        `num_devices` devices (the relations between its fields)."""

    def bn_splits(self, config, num_devices: int) -> int:
        """BN groups per device: `config.bn_splits`, or its value for 0 (auto)."""

    def warning(self, config, num_devices: int) -> str:
        """What about this config is weaker than the paper's recipe, naming the fix; '' if nothing."""

    def build_encoder(self, config, backbone: nn.Module, axis_name: str) -> nn.Module:
        """The encoder around `backbone`: `__call__(x, train)` -> (features,
        embedding) is the key (momentum) encoder's function and evaluation's;
        `query(x, train)` the query encoder's."""

    def queue_size(self, config) -> int:
        """Rows of negatives the state holds (0: no queue)."""

    def hparams(self, config, total_steps: int, axis_name: str) -> Any:
        """The static hyper-parameters of `train_step`."""

    def train_step(self, state, batch, hp, views: Views) -> tuple[Any, dict[str, jax.Array]]:
        """One step on one device's share of the batch, run under pmap:
        (state, batch) -> (new state, metrics averaged over the global batch)."""

    def negatives(self, config) -> str:
        """Where the negatives come from, in words ("queue of 65536")."""

    def describe_heads(self, config) -> str:
        """The heads on the backbone, in words ("an MLP head")."""


# The fields every method reads (configs/default.py), and what they may hold.
FIELDS = {
    "temperature": POSITIVE,
    "momentum": number(0, 1),
    "momentum_schedule": one_of(MOMENTUM_SCHEDULES),
    "embed_dim": integer(1),
    "bn_splits": integer(0, " (0 = auto)"),
    # MoCo v1/v2's queue and shuffle BN: in every config, since v3 refuses them set.
    "queue_size": integer(0, " (0: no queue, MoCo v3)"),
    "shuffle_bn": BOOL,
}


def plain_bn_splits(config) -> int:
    """`config.bn_splits`, 0 (auto) meaning 1: BN over the device's whole batch."""
    return int(config.bn_splits) or 1


def check_bn_groups(config, num_devices: int, splits: int) -> None:
    """Each device's batch splits into `splits` BN groups of 2 or more images."""
    batch = config.batch_size
    per_device = batch // num_devices
    if splits <= 0 or per_device % splits:
        raise ConfigError(
            f"bn_splits={splits} must be 0 (auto) or a positive number that divides the per-device batch "
            f"(batch_size={batch} / {num_devices} devices = {per_device})"
        )
    if per_device // splits < 2:
        raise ConfigError(
            f"bn_splits={splits} leaves {per_device // splits} image per BN group (batch_size={batch} / "
            f"{num_devices} devices / {splits} splits); BN needs at least 2: lower bn_splits "
            "(on n devices, bn_splits=1 already gives shuffle BN over n groups)"
        )
