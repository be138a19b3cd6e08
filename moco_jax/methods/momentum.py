"""The momentum (key) encoder's update, shared by every MoCo method:

    theta_k <- m * theta_k + (1 - m) * theta_q

applied to the parameters only (BN statistics are the key encoder's own),
before the key forward pass; m constant (MoCo v1/v2) or rising to 1 on a
cosine (MoCo v3's `--moco-m-cos`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from moco_jax.core.errors import ConfigError

MOMENTUM_SCHEDULES = ("constant", "cosine")  # config.momentum_schedule


def momentum_update(momentum_params: Any, params: Any, momentum: float) -> Any:
    """theta_k <- m * theta_k + (1 - m) * theta_q (optax takes the step 1 - m)."""
    return optax.incremental_update(params, momentum_params, step_size=1.0 - momentum)


def momentum_at(step: jax.Array | int, base: float, schedule: str, total_steps: int) -> jax.Array | float:
    """The key encoder's momentum m for the update before optimizer step
    `step` (0-based). "constant": `base`. "cosine" (moco-v3
    `adjust_moco_momentum`, per iteration):
        m = 1 - (1 - base) * (1 + cos(pi * step / total_steps)) / 2,
    `base` at step 0, 1 at the end of training."""
    if schedule == "constant":
        return base
    t = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def check_schedule(schedule: str, total_steps: int) -> None:
    """A known schedule; the cosine one needs the run's length."""
    if schedule not in MOMENTUM_SCHEDULES:
        raise ConfigError(f"momentum_schedule={schedule!r} must be one of {', '.join(map(repr, MOMENTUM_SCHEDULES))}")
    if schedule == "cosine" and total_steps <= 0:
        raise ValueError("momentum_schedule='cosine' needs the run's total_steps (make_train_step's total_steps)")
